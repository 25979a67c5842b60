"""What the "auto" defaults run: the sampler (``jacobi=None``) and the pipelining (``pipeline=None``) measured faster.

The rule, and what it rests on:

- CPU: sequential. MLX's CPU backend runs one op at a time, so Jacobi's extra
  token evaluations (3-12 iterations of a whole chunk per chunk) cost time
  one-for-one. Measured on a 2-core x86-64 Linux machine with MKL:
  ``starflow generate 7 --model demo -n 16`` took 1.4-1.7 s sequential against
  3.9-4.7 s Jacobi, and ``starflow bench --config small`` shows the same order
  (benchmarks/README.md).
- GPU (Metal, CUDA): Jacobi, when the model has a start-of-sequence token
  (Jacobi needs one). A GPU runs a chunk of tokens in about the time of one, so
  fewer host round-trips win; this is upstream's own setting for its GPUs. It
  has not been timed with MLX on a GPU yet: ``starflow bench`` shows the choice
  next to both timings so it can be checked on any machine.

Whether ``pipeline=None`` pipelines the deep and shallow blocks of a frame-local
video model over its frames (:mod:`starflow_mlx.sampling.pipelined`):

- CPU: no. Pipelined, the shallow blocks run frame by frame (T times the steps
  of one pass over all frames) beside the deep block, which pays only with a
  core to spare. On the 2-core shared x86-64 Linux machine, where the process
  got one core's time, ``python -m starflow_mlx.benchmarks.video_pipelining``
  took 1.15-1.9x as long sequential and 1.06-1.17x Jacobi in four of five runs
  (the fifth, 0.70x and 0.97x, was noise; benchmarks/README.md).
- GPU: not yet either. It is the paper's pipelined execution and should pay where a
  second queue can run beside the first, but it has not been timed (or even run) with
  MLX on a GPU, and it drives the GPU from two threads: until the same benchmark has
  shown it faster and sound there, it stays an explicit ``pipeline=True``.
"""

from __future__ import annotations

import mlx.core as mx

from starflow_mlx.advice import with_cli_message

# Settings that only the Jacobi sampler reads: giving one asks for Jacobi.
JACOBI_SETTINGS = ("jacobi_block_size", "jacobi_threshold", "jacobi_max_iter")


def choose_jacobi(config, device: mx.Device | None = None) -> bool:
    """True when Jacobi is the faster sampler for a model with ``config`` on ``device``."""
    device = mx.default_device() if device is None else device
    return bool(config.sos) and device.type != mx.DeviceType.cpu


def resolve_jacobi(jacobi: bool | None, config, device: mx.Device | None = None) -> bool:
    """An explicit choice as given; ``None`` (auto) by :func:`choose_jacobi`."""
    return choose_jacobi(config, device) if jacobi is None else bool(jacobi)


def implied_jacobi(jacobi: bool | None, **settings) -> bool | None:
    """``jacobi``, or True when any of the Jacobi ``settings`` is given (not None) and the choice was left to us.

    With ``jacobi=False`` a given setting could not take effect: that is an error, not a silent no-op.
    """
    given = [name for name in JACOBI_SETTINGS if settings.get(name) is not None]
    if given and jacobi is False:
        flag = "--" + given[0].replace("_", "-")
        raise with_cli_message(ValueError(f"{given[0]} is for Jacobi sampling, and jacobi=False asks for sequential: "
                                          f"drop one of them"),
                               f"{flag} is for Jacobi sampling, and --no-jacobi asks for sequential: drop one of them")
    return True if given else jacobi


def jacobi_settings(jacobi: bool | None, config, defaults: dict, device: mx.Device | None = None,
                    **settings) -> tuple[bool, dict]:
    """The sampler that runs (see :func:`implied_jacobi`, then :func:`resolve_jacobi`) and the Jacobi settings it
    uses: those given, else ``defaults``; none for a sequential run, so that nothing records settings it ignored."""
    if not resolve_jacobi(implied_jacobi(jacobi, **settings), config, device):
        return False, {}
    return True, {name: defaults[name] if settings.get(name) is None else settings[name] for name in JACOBI_SETTINGS}


def choose_pipeline(device: mx.Device | None = None) -> bool:
    """True when pipelining deep and shallow blocks over video frames is the default on ``device``: nowhere yet."""
    return False


def resolve_pipeline(pipeline: bool | None, device: mx.Device | None = None) -> bool:
    """An explicit choice as given; ``None`` (auto) by :func:`choose_pipeline`."""
    return choose_pipeline(device) if pipeline is None else bool(pipeline)
