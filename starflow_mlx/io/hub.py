"""Models by Hugging Face repo id: download once (cached, resumable), convert once, reuse.

Which files make a model, and which repo each comes from, is listed in one file,
``registry.json`` beside this module; a JSON file named by ``STARFLOW_MLX_REGISTRY``
(same layout) adds or replaces entries; a model's ``revision`` pins its flow repo.
Downloads go through ``huggingface_hub`` into its cache (``HF_HUB_CACHE``), which
resumes interrupted files and shows progress.
Converted folders live in ``~/.cache/starflow-mlx/<org>--<name>--<revision>`` (or under
``STARFLOW_MLX_CACHE``) and are reused as they are once complete. Offline
(``HF_HUB_OFFLINE=1``, or a hub that does not answer within seconds), every file missing
from the Hugging Face cache is named in one line, followed by one line of commands that get them.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

REGISTRY = Path(__file__).resolve().parents[1] / "registry.json"
REGISTRY_ENV, CACHE_ENV = "STARFLOW_MLX_REGISTRY", "STARFLOW_MLX_CACHE"
TRUE = {"1", "on", "yes", "true"}
PROBE_SECONDS = 3.0


class HubError(OSError):
    """Files a model needs could not be found or downloaded, or the registry is unusable."""


@dataclass(frozen=True)
class HubFile:
    repo: str
    filename: str
    revision: str = "main"


# -- registry ------------------------------------------------------------------------------
def _read_registry(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HubError(f"model registry {path} cannot be read ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models", {}), dict) \
            or not isinstance(data.get("components", {}), dict):
        raise HubError(f"model registry {path} needs 'models' and 'components' objects")
    return data


def load_registry(path: str | Path | None = None) -> dict:
    """The built-in registry with the entries of ``path`` (or ``$STARFLOW_MLX_REGISTRY``) added on top."""
    data = _read_registry(REGISTRY)
    extra = path if path is not None else os.environ.get(REGISTRY_ENV)
    if extra:
        more = _read_registry(Path(extra))
        for key in ("models", "components"):
            data[key] = {**data.get(key, {}), **more.get(key, {})}
    return data


def component_files(registry: dict, repo: str, role: str = "component") -> list[HubFile]:
    files = registry.get("components", {}).get(repo)
    if not files:
        raise HubError(f"{role} {repo} is not a local folder and the model registry has no file list for it: "
                       f"download it ({cli_name()} download {repo}) and pass its folder")
    return [HubFile(repo, name) for name in files]


def model_files(registry: dict, repo_id: str) -> dict[str, list[HubFile]]:
    """Every file a registry model needs, by role: checkpoint, config, text_encoder, vae, decoder."""
    models = registry.get("models", {})
    if repo_id not in models:
        raise HubError(f"unknown model {repo_id!r}: it is neither a folder here nor a registered Hugging Face model "
                       f"(known models are {', '.join(sorted(models)) or 'none'}, plus 'demo' and 'demo-video')")
    entry = models[repo_id]
    try:
        flow, revision = entry["flow"], entry.get("revision", "main")
        files = {"checkpoint": [HubFile(flow["repo"], flow["checkpoint"], revision)],
                 "config": [HubFile(flow["repo"], flow["config"], revision)],
                 "text_encoder": component_files(registry, entry["text_encoder"], "text encoder"),
                 "vae": component_files(registry, entry["vae"], "VAE"),
                 "decoder": [HubFile(entry["decoder"]["repo"], entry["decoder"]["file"])] if entry.get("decoder") else []}
    except (KeyError, TypeError) as exc:
        raise HubError(f"model registry entry {repo_id} is incomplete (no {exc})") from None
    return files


# -- Hugging Face cache ----------------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/starflow-mlx").expanduser()


def hf_cache_dir() -> Path:
    """The Hugging Face cache as the environment names it now (huggingface_hub reads it once, at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE or bool(constants.HF_HUB_OFFLINE)


def cli_name() -> str:
    import huggingface_hub

    major, minor = (int(part) for part in huggingface_hub.__version__.split(".")[:2])
    return "hf" if (major, minor) >= (0, 34) else "huggingface-cli"


def failure_reason(exc: Exception, file: HubFile) -> str:
    """Why a file could not be had, from huggingface_hub's error classes (named, to work across versions)."""
    kinds = {cls.__name__ for cls in type(exc).__mro__}
    if "GatedRepoError" in kinds:
        return f"gated: accept its licence on huggingface.co/{file.repo} and run {cli_name()} auth login"
    if "RepositoryNotFoundError" in kinds:
        return "no such repo (or it is private)"
    if "RevisionNotFoundError" in kinds:
        return f"no revision {file.revision}"
    if "LocalEntryNotFoundError" in kinds:
        return ""  # simply not cached: the usual offline case
    if "EntryNotFoundError" in kinds:
        return "not in the repo"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def missing_message(missing: list[tuple[HubFile, str]], why: str, cache: Path) -> str:
    """One line saying what is missing and why, then one line of commands that fetch it (to paste as is)."""
    by_repo: dict[tuple[str, str], list[str]] = {}
    for file, _ in missing:
        by_repo.setdefault((file.repo, file.revision), []).append(file.filename)
    counts = ", ".join(f"{repo} ({len(names)})" for (repo, _), names in by_repo.items())
    reasons = "".join(f"; {file.repo}/{file.filename}: {reason}" for file, reason in missing if reason)
    commands = " && ".join(f"{cli_name()} download {repo}" + (f" --revision {rev}" if rev != "main" else "")
                           + " " + " ".join(names) for (repo, rev), names in by_repo.items())
    return (f"{len(missing)} file(s) of {counts} missing from the Hugging Face cache {cache} ({why}){reasons}: "
            f"fetch them on a connected machine as below and copy that cache here, or convert a local checkpoint "
            f"(starflow convert)\n  {commands}")


def endpoint() -> str:
    """The hub address as the environment names it now (huggingface_hub reads HF_ENDPOINT once, at import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the hub (or the HTTPS proxy in the way) opens within ``timeout``.

    One quick look instead of huggingface_hub's minutes of retries per file when there is no network.
    """
    scheme = "HTTPS" if url.startswith("https") else "HTTP"
    proxy = os.environ.get(f"{scheme}_PROXY") or os.environ.get(f"{scheme.lower()}_proxy")
    parsed = urlsplit(proxy or url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def download(files: list[HubFile]) -> dict[HubFile, Path]:
    """Local paths of ``files``, fetched into the Hugging Face cache as needed; all failures in one error."""
    from huggingface_hub import hf_hub_download

    cache = hf_cache_dir()
    offline, why = hub_offline(), "offline mode is on"
    if not offline and not hub_reachable(endpoint()):
        offline, why = True, f"{endpoint()} cannot be reached"
    found: dict[HubFile, Path] = {}
    missing: list[tuple[HubFile, str]] = []
    for file in dict.fromkeys(files):
        try:
            found[file] = Path(hf_hub_download(file.repo, file.filename, revision=file.revision, cache_dir=cache,
                                               local_files_only=offline))
        except (OSError, ValueError) as exc:  # all of huggingface_hub's download errors derive from these
            missing.append((file, failure_reason(exc, file)))
    if missing:
        raise HubError(missing_message(missing, why if offline else "they could not be downloaded", cache))
    return found


def snapshot_dir(path: Path, filename: str) -> Path:
    """The snapshot folder a cached file sits in (filenames may contain sub-folders)."""
    for _ in Path(filename).parts:
        path = path.parent
    return path


# -- public entry points -------------------------------------------------------------------
def fetch_component(repo: str, role: str, registry: str | Path | None = None) -> Path:
    """The local snapshot folder of a registered text encoder or VAE repo, downloading what it lacks."""
    files = component_files(load_registry(registry), repo, role)
    paths = download(files)
    return snapshot_dir(paths[files[0]], files[0].filename)
