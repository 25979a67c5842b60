"""``python -m starflow_mlx``: the ``starflow`` command line."""

from starflow_mlx.apps.cli import main

main()
