"""Model names to folders: a local folder, a built-in model, or a Hugging Face repo id.

A repo id is downloaded once (:mod:`starflow_mlx.io.hub`) and converted once (:mod:`starflow_mlx.convert`)
into the cache, then reused. This sits above both: the hub only fetches files, and conversion
never resolves names.
"""

from __future__ import annotations

import difflib
import shutil
import sys
import tempfile
from pathlib import Path

from starflow_mlx.convert.full_model import build_model_folder
from starflow_mlx.io.hub import HubError, cache_root, download, load_registry, model_files, snapshot_dir
from starflow_mlx.jsonconfig import ConfigError
from starflow_mlx.io.model_folder import BUILT_IN, MANIFEST, local_model


def resolve_model(name: str | Path) -> Path:
    """A model folder from a path, a built-in name (``demo``, ``demo-video``), or a Hugging Face repo id (downloaded and
    converted once)."""
    folder = local_model(name)
    if folder is not None:
        return folder
    path = Path(name).expanduser()
    if "/" in str(name) and not path.exists() and not str(name).startswith((".", "/", "~")):
        return ensure_model(str(name))
    # A typo of a known name ('dmeo', 'starflow') is the likeliest first mistake: name the fix.
    close = difflib.get_close_matches(str(name), [*BUILT_IN, *load_registry().get("models", {})], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"model {name!r} not found{hint}: pass a model folder, 'demo', 'demo-video', or a Hugging Face "
                      "repo id like apple/starflow")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_model(repo_id: str, registry: str | Path | None = None) -> Path:
    """A converted model folder for a registered repo id: downloaded and converted on first use, then reused."""
    reg = load_registry(registry)
    files = model_files(reg, repo_id)
    entry = reg["models"][repo_id]
    revision = entry.get("revision", "main")
    root = cache_root()
    target = root / f"{repo_id.replace('/', '--')}--{revision}"
    if (target / MANIFEST).is_file():
        return target
    if target.exists():
        raise HubError(f"{target} holds an incomplete conversion: delete it and run again")
    paths = download([f for group in files.values() for f in group])

    def origin(role: str) -> str:
        file = files[role][0]
        where = snapshot_dir(paths[file], file.filename)
        return f"{file.repo}@{where.name}" + (f"/{file.filename}" if role in ("checkpoint", "config", "decoder") else "")

    _log(f"converting {repo_id} into {target} (once; later runs reuse it)")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        first = {role: group[0] for role, group in files.items() if group}
        build_model_folder(
            paths[first["checkpoint"]], paths[first["config"]], staging / "model",
            text_encoder=snapshot_dir(paths[first["text_encoder"]], first["text_encoder"].filename),
            vae=snapshot_dir(paths[first["vae"]], first["vae"].filename),
            decoder=paths[first["decoder"]] if "decoder" in first else None,
            dtype=entry.get("dtype", "float16"),
            source={"repo": repo_id, "revision": revision, "checkpoint": origin("checkpoint"),
                    "config": origin("config"), "text_encoder": origin("text_encoder"), "vae": origin("vae"),
                    "finetuned_decoder": origin("decoder") if "decoder" in first else None})
        try:
            (staging / "model").rename(target)
        except OSError:
            if not (target / MANIFEST).is_file():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
