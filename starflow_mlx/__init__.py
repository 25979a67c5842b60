"""starflow-mlx: Apple's STARFlow and STARFlow-V flows on Apple Silicon, in MLX.

    import starflow_mlx
    flow = starflow_mlx.load_flow("demo")
    pipe = starflow_mlx.Pipeline.from_pretrained("demo")
"""

__version__ = "0.1.0"

from starflow_mlx import blas as _blas

# Linux: load a fast BLAS for MLX when mlx is first imported (or warn in one line if it is too late).
_blas.install_hook()
_blas.check()

# Imported on first use so that `starflow --help` and light imports stay fast.
_EXPORTS = {
    "load_flow": ("starflow_mlx.io.loading", "load_flow"),
    "FlowConfig": ("starflow_mlx.config", "FlowConfig"),
    "STARFlow": ("starflow_mlx.models.starflow", "STARFlow"),
    "load_text_encoder": ("starflow_mlx.io.text_encoder", "load_text_encoder"),
    "load_vae": ("starflow_mlx.io.vae", "load_vae"),
    "load_video_vae": ("starflow_mlx.io.video_vae", "load_video_vae"),
    "Pipeline": ("starflow_mlx.pipelines.image", "Pipeline"),
    "VideoPipeline": ("starflow_mlx.pipelines.video", "VideoPipeline"),
    "load_pipeline": ("starflow_mlx.pipelines.load", "load_pipeline"),
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'starflow_mlx' has no attribute {name!r}")
