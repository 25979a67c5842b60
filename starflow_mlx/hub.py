"""Models by Hugging Face repo id: download once (cached, resumable), convert once, reuse.

Which files make a model, and where each comes from, is listed in one file,
``registry.json`` beside this module (``STARFLOW_MLX_REGISTRY`` points to
another). Converted folders live in ``~/.cache/starflow-mlx`` (or
``STARFLOW_MLX_CACHE``). Offline (``HF_HUB_OFFLINE=1`` or no network), every
file missing from the Hugging Face cache is listed in one message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REGISTRY = Path(__file__).with_name("registry.json")


class HubError(OSError):
    """Files a model needs could not be found or downloaded."""


def registry() -> dict:
    path = Path(os.environ.get("STARFLOW_MLX_REGISTRY", REGISTRY))
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HubError(f"model registry {path} cannot be read ({exc})") from None


def cache_root() -> Path:
    return Path(os.environ.get("STARFLOW_MLX_CACHE", "~/.cache/starflow-mlx")).expanduser()


def download(files: list[tuple[str, str]]) -> dict[tuple[str, str], Path]:
    """Fetch (repo, filename) pairs into the Hugging Face cache; list every one that cannot be had."""
    from huggingface_hub import hf_hub_download

    found, missing = {}, []
    for repo, filename in files:
        try:
            found[(repo, filename)] = Path(hf_hub_download(repo, filename))
        except Exception:  # offline, not found, auth, network: all end in "missing", listed together below
            missing.append((repo, filename))
    if missing:
        listing = ", ".join(f"{r}/{f}" for r, f in missing)
        commands = "; ".join(f"huggingface-cli download {r} {' '.join(f for rr, f in missing if rr == r)}"
                             for r in dict.fromkeys(r for r, _ in missing))
        offline = " (offline mode is on)" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else ""
        raise HubError(f"{len(missing)} file(s) missing from the Hugging Face cache{offline}: {listing}. "
                       f"Get them on a connected machine with: {commands}; or convert a local checkpoint "
                       "with starflow convert")
    return found


def _component_files(repo: str) -> list[str]:
    files = registry().get("components", {}).get(repo)
    if not files:
        raise HubError(f"no file list for {repo} in the model registry: download it yourself and pass the folder")
    return files


def fetch_component(repo: str, role: str) -> Path:
    """The local snapshot folder of a text encoder or VAE repo, downloading what it lacks."""
    paths = download([(repo, f) for f in _component_files(repo)])
    return paths[(repo, "config.json")].parent


def ensure_model(repo_id: str) -> Path:
    """A converted model folder for ``repo_id``, built on first use."""
    models = registry().get("models", {})
    if repo_id not in models:
        raise HubError(f"unknown model {repo_id!r}: known models are {', '.join(sorted(models)) or 'none'}, "
                       "plus 'demo' and local folders")
    target = cache_root() / repo_id.replace("/", "--")
    if (target / "starflow.json").is_file():
        return target
    entry = models[repo_id]
    flow = entry["flow"]
    wanted = [(flow["repo"], flow["checkpoint"]), (flow["repo"], flow["config"])]
    for role in ("text_encoder", "vae"):
        wanted += [(entry[role], f) for f in _component_files(entry[role])]
    if entry.get("decoder"):
        wanted.append((entry["decoder"]["repo"], entry["decoder"]["file"]))
    paths = download(wanted)

    from starflow_mlx.convert.full_model import build_model_folder

    decoder = paths[(entry["decoder"]["repo"], entry["decoder"]["file"])] if entry.get("decoder") else None
    build_model_folder(paths[(flow["repo"], flow["checkpoint"])], paths[(flow["repo"], flow["config"])], target,
                       text_encoder=paths[(entry["text_encoder"], "config.json")].parent,
                       vae=paths[(entry["vae"], "config.json")].parent, decoder=decoder,
                       dtype=entry.get("dtype", "float16"))
    return target
