"""Read weights safely: a flow folder's tensors checked against its config before any is loaded.

The I/O layer under the loaders (:mod:`starflow_mlx.io.loading`, the text encoder, the VAEs, LoRA
adapters): it knows files and configs, never model names, hubs or pipelines.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from starflow_mlx.config import ConfigError, FlowConfig
from starflow_mlx.models.starflow import STARFlow
from starflow_mlx.quantize.policy import apply_quantization

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class ModelLoadError(ValueError):
    """A model folder is missing, incomplete or does not match its config."""


def read_config(kind, folder: Path, what: str | None = None, otherwise: str = ""):
    """``folder/config.json`` as the config dataclass ``kind``, every failure a one-line ModelLoadError; with
    ``what``, a folder without one is named as a ``what`` folder that is neither converted nor ``otherwise``."""
    if what is not None and not (folder / "config.json").is_file():
        raise ModelLoadError(f"{what} folder {folder} has no config.json: give a converted folder (starflow convert) "
                             f"or {otherwise}")
    try:
        return kind.load(folder / "config.json")
    except ConfigError as exc:
        raise ModelLoadError(str(exc)) from None


def parse_dtype(name: str | None):
    if name is None:
        return None
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def auto_dtype(quantized: bool, device: mx.Device | None = None):
    """Compute dtype when none is asked for, or None to keep the stored one.

    MLX's CPU quantized-matmul kernels are ~15x slower with float16 scales than
    with float32 ones (demo, 8-bit: 7.6 s against 0.49 s for four digits), so a
    quantized model on the CPU runs its scales, biases and activations in
    float32 (a few MB more). Unquantized weights stay as stored: float32 would
    double their memory (float16 runs ~2x slower than float32 on the CPU;
    ``dtype="float32"`` buys that back), and Metal/CUDA are fast in float16.
    """
    device = mx.default_device() if device is None else device
    if quantized and device.type == mx.DeviceType.cpu:
        return mx.float32
    return None


def cast_floats(model, dtype) -> None:
    """Cast floating-point parameters (not quantized integers) to ``dtype``."""
    model.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))


def check_weight_bytes(config, path: Path) -> None:
    """Refuse, before a model is built, a config describing more weights than ``path`` can hold."""
    from starflow_mlx.convert.safetensors_stream import SafetensorsError, read_header

    if not path.is_file():
        return  # load_weights_strict says so
    try:
        read_header(path)  # a damaged file is reported as such, not as too small
    except SafetensorsError as exc:
        raise ModelLoadError(str(exc)) from None
    needed, held = config.min_weight_bytes(), path.stat().st_size
    if needed > held:
        raise ModelLoadError(f"its config.json describes at least {needed:,} bytes of weights but {path} holds "
                             f"{held:,}: the config and weights do not belong together")


def check_finite_weights(weights: list[tuple[str, mx.array]], where: str) -> None:
    """Refuse weights holding NaN or infinity (a damaged download, a diverged training run): every loader and
    adapter comes here, since such a model would write black images or "nan bits/dim" without an error."""
    floats = [(name, w) for name, w in weights if mx.issubdtype(w.dtype, mx.floating)]
    if not floats:
        return
    finite = mx.stack([mx.all(mx.isfinite(w)) for _, w in floats]).tolist()
    bad = next((name for (name, _), ok in zip(floats, finite) if not ok), None)
    if bad is not None:
        raise ModelLoadError(f"{where}: {bad} holds NaN or infinite values: the weights are damaged "
                             "(convert, download or train them again)")


def load_checked(model, weights: list[tuple[str, mx.array]], where: str, strict: bool = True) -> None:
    """``model.load_weights`` after :func:`check_finite_weights`."""
    check_finite_weights(weights, where)
    model.load_weights(weights, strict=strict)


def load_weights_strict(model, path: Path, only: dict | None = None, file_names: dict[str, str] | None = None,
                        unread: set[str] = frozenset()) -> None:
    """Load safetensors into ``model``, naming the first missing, extra, misshapen or mistyped tensor.

    The file's header is checked first (see ``read_header``), so nothing unexpected is ever loaded.
    ``only`` (names -> current arrays) loads just those parameters, e.g. a LoRA adapter's; the file must
    hold exactly them. ``file_names`` maps a parameter to its name in the file where they differ, and
    ``unread`` names tensors the file holds that this model leaves alone (another rank's layers): MLX
    reads safetensors lazily, so they never reach memory.
    """
    from starflow_mlx.convert.safetensors_stream import SafetensorsError, read_header
    from starflow_mlx.convert.tensor_names import check_tensor_names

    if not path.is_file():
        raise ModelLoadError(f"{path} not found: the model folder is incomplete (re-run starflow convert)")
    try:
        header = read_header(path)
    except SafetensorsError as exc:
        raise ModelLoadError(str(exc)) from None
    file_names = file_names or {}
    params = tree_flatten(model.parameters()) if only is None else list(only.items())
    local = {file_names.get(name, name): name for name, _ in params}
    expected = {stored: arr for stored, (_, arr) in zip(local, params)}
    mismatch = "it does not match its config.json"
    check_tensor_names(expected, set(header) - set(unread), str(path), ModelLoadError, mismatch, mismatch)
    for name, arr in expected.items():
        stored, shape = header[name]
        if shape != tuple(arr.shape):
            raise ModelLoadError(f"{path}: {name} has shape {shape}, config.json needs {tuple(arr.shape)}")
        wanted = str(arr.dtype).removeprefix("mlx.core.")
        if stored not in (DTYPES if mx.issubdtype(arr.dtype, mx.floating) else (wanted,)):
            raise ModelLoadError(f"{path}: {name} is stored as {stored}, not {' or '.join(DTYPES) if wanted in DTYPES else wanted}: "
                                 "the file is damaged or not written by starflow-mlx (re-run starflow convert)")
    try:
        weights = mx.load(str(path))
    except Exception as exc:  # mlx raises RuntimeError/ValueError with long texts on corrupt files
        raise ModelLoadError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    load_checked(model, [(local[name], weights[name]) for name in expected], str(path), strict=only is None)


def build_flow(folder: Path, layers: range | None = None) -> STARFlow:
    """The flow of a model folder with its stored weights, as stored (quantized layers rebuilt from the config).

    ``layers`` keeps only those layers of the deep block and reads only their weights (one rank's share).
    """
    config = read_config(FlowConfig, folder)
    check_weight_bytes(config, folder / "model.safetensors")
    model = STARFlow(config)
    if config.quantization:
        apply_quantization(model, config.quantization)
    file_names, unread = {}, set()
    if layers is not None:
        from starflow_mlx.io.distributed import keep_deep_layers

        file_names, unread = keep_deep_layers(model, layers)
    load_weights_strict(model, folder / "model.safetensors", file_names=file_names, unread=unread)
    return model
