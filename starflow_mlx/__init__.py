"""starflow-mlx: Apple's STARFlow and STARFlow-V flows on Apple Silicon, in MLX."""

__version__ = "0.1.0"
