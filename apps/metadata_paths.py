"""The rule for paths named by a file's metadata (``generate --from-metadata``): never opened unless given again.

A file's metadata comes from whoever made the file. It names the first frame (``image``), the clip continued
(``video``), the LoRA adapter and the model; followed as recorded, a crafted file would make ``generate`` read
any local file or folder. So a built-in model name or a Hugging Face repo id is used as recorded, and a local
path only when the same option gives a path on the command line (``--model``, ``--lora``, ``--image``,
``--video``): that one is used. An image or clip given again must also have the sha256 the metadata records.
An input the file was made without is refused, as it would not make the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from starflow_mlx.safe_text import printable

OPTION = {"image": "--image", "video": "--video", "lora": "--lora", "model": "--model"}
NAMES = {"image": "first frame (image)", "video": "clip (video)", "lora": "LoRA adapter", "model": "model folder"}


def is_local(name: str) -> bool:
    """Whether loading ``name`` would read a local path, rather than a built-in model or a Hugging Face repo id
    (the order of ``model_folder.resolve_model``)."""
    from starflow_mlx.io.model_folder import BUILT_IN

    try:
        if Path(name).expanduser().exists():
            return True
    except (OSError, ValueError):  # a NUL byte, a name too long: not a name the hub or the built-ins know
        return True
    hub = "/" in name and not name.startswith((".", "/", "~"))
    return not (name in BUILT_IN or hub)


def _unconfirmed(made: Path, role: str, recorded: str) -> ValueError:
    shown = printable(recorded, 300)
    return ValueError(f"{made}'s metadata names the {NAMES[role]} {shown}: a path from a file's metadata is "
                      f"opened only when given again, so pass {OPTION[role]} {shown} (or the path it has now)")


def _not_used(made: Path, role: str) -> ValueError:
    return ValueError(f"{made} was made without {OPTION[role]}: drop {OPTION[role]} to make it again")


def confirm_path(recorded: Optional[str], given: Optional[Path | str], role: str, made: Path) -> Optional[str]:
    """The model or adapter to load: the recorded name when it is not a local path, else the command line's."""
    if given is not None:
        if recorded is None:
            raise _not_used(made, role)
        return str(given)
    if recorded is not None and is_local(recorded):
        raise _unconfirmed(made, role, recorded)
    return recorded


def confirm_input(recorded: Optional[str], sha256: Optional[str], given: Optional[Path], role: str,
                  made: Path) -> tuple[Optional[str], Optional[str]]:
    """(path, sha256) of the image or clip to start from: the command line's, checked against the recorded hash."""
    from starflow_mlx.pipelines.video_io import input_record

    if recorded is None:
        if given is not None:
            raise _not_used(made, role)
        return None, None
    if given is None:
        raise _unconfirmed(made, role, recorded)
    path, digest = input_record(given, role)
    if sha256 is not None and digest != sha256:  # files written before hashes were kept have none
        raise ValueError(f"{OPTION[role]} {given} is not the {role} {made} was made from (its sha256 differs from "
                         "the one the metadata records): give the original file")
    return path, digest


def confirm_adapters(recorded: Optional[str | list[str]], given: Optional[str | list[str]], made: Path):
    """The adapter(s) to load (:func:`confirm_path` for each): several recorded must be given again as several,
    in their order."""
    if not isinstance(recorded, list) and not isinstance(given, list):
        return confirm_path(recorded, given, "lora", made)
    listed = recorded if isinstance(recorded, list) else [] if recorded is None else [recorded]
    again = given if isinstance(given, list) else [] if given is None else [given]
    if again and not listed:
        raise _not_used(made, "lora")
    if again and len(again) != len(listed):
        raise ValueError(f"{made} was made with {len(listed)} LoRA adapters: give --lora {len(listed)} times, in the "
                         "order its metadata lists them")
    return [confirm_path(name, again[i] if again else None, "lora", made) for i, name in enumerate(listed)]
