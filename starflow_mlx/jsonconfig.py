"""Typed JSON configs: the one loader and writer behind every ``config.json`` and manifest.

A config is a dataclass inheriting :class:`JSONConfig`. Reading checks each value
against the field's annotation (``int``, ``float``, ``bool``, ``str``, ``list[...]``,
``dict[...]``, ``X | None``, ``Any``, another JSONConfig) and against optional bounds in the field's
metadata (``field(default=..., metadata={"min": 1, "max": 4096})``), so a damaged or
hostile file fails with one line naming the field instead of reaching model code.
Files are small by nature: larger or more deeply nested ones are refused before parsing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

MAX_BYTES = 1 << 20  # the largest real config (a quantization plan of a 7B flow) is ~100 KB
MAX_DEPTH = 64


class ConfigError(ValueError):
    """A config file is missing, unreadable or inconsistent."""


def nesting_depth(text: str) -> int:
    """Deepest bracket nesting of a JSON (or flow-style YAML) text, strings skipped, without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def read_json(path: str | Path, what: str = "config") -> Any:
    """Parse a small JSON file with bounded size and nesting; every failure is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ConfigError(f"{what} {path} is {size} bytes, far larger than any real one ({MAX_BYTES} at most)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} cannot be read ({type(exc).__name__})") from None
    return parse_json(text, f"{what} {path}", what)


def parse_json(text: str, where: str, what: str = "config") -> Any:
    """Parse JSON text with bounded nesting (``where`` names it in the one-line ConfigError)."""
    if nesting_depth(text) > MAX_DEPTH:
        raise ConfigError(f"{where} is nested more than {MAX_DEPTH} levels deep: it is not a real {what}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (RecursionError, ValueError) as exc:
        raise ConfigError(f"{where} cannot be parsed ({type(exc).__name__})") from None


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename), with the permissions a new file gets here."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _type_name(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(kind))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(kind))}]"
    return "null" if kind is type(None) else getattr(kind, "__name__", str(kind))


def _check(value: Any, kind: Any, where: str) -> Any:
    """``value`` as ``kind`` (ints widen to float); ConfigError naming ``where`` otherwise."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, str):  # said as such, not as "must be str or null"
            _text(value, where)
        nested = None
        for option in args:
            try:
                return _check(value, option, where)
            except ConfigError as exc:
                if isinstance(value, dict) and isinstance(option, type) and issubclass(option, JSONConfig):
                    nested = exc  # an object meant as that config: its own error names the field at fault
        if nested is not None:
            raise nested
        raise ConfigError(f"{where} must be {_type_name(kind)}, got {_describe(value)}")
    if kind is type(None):
        if value is None:
            return None
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and abs(value) > 2**1023 or not math.isfinite(value):
                raise ConfigError(f"{where} must be a finite number, got {_describe(value)}")
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return _text(value, where)
    elif origin is list or kind is list:
        if isinstance(value, list):
            return [_check(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    elif isinstance(kind, type) and issubclass(kind, JSONConfig):
        return value if isinstance(value, kind) else kind.from_dict(value, where)
    elif origin is dict or kind is dict:
        if isinstance(value, dict):
            key_kind, value_kind = args if args else (Any, Any)
            return {_check(k, key_kind, f"{where} key"): _check(v, value_kind, f"{where}.{k}") for k, v in value.items()}
    else:
        raise TypeError(f"unsupported config annotation {kind!r} for {where}")
    raise ConfigError(f"{where} must be {_type_name(kind)}, got {_describe(value)}")


def _text(value: str, where: str) -> str:
    """``value`` if it is text UTF-8 can hold: JSON's ``"\\ud800"`` escape parses to a lone surrogate, which no
    encoder writes out again (a response or file holding it fails long after it was accepted)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(f"{where} is not valid text: it holds a lone surrogate ({value[exc.start]!r} at "
                          f"character {exc.start})") from None
    return value


def _describe(value: Any) -> str:
    """A short, printable description of a file-provided value (never formats anything huge)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        value = value[:40]
    text = json.dumps(value) if not isinstance(value, (dict, list)) and not dataclasses.is_dataclass(value) \
        else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _check_bounds(value: Any, meta: typing.Mapping, where: str) -> None:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        if "min" in meta and item < meta["min"]:
            raise ConfigError(f"{where} must be at least {meta['min']}, got {item}")
        if "max" in meta and item > meta["max"]:
            raise ConfigError(f"{where} must be at most {meta['max']}, got {item}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, meta['choices']))}, got {_describe(value)}")
    if "max_len" in meta and isinstance(value, (list, dict, str)) and len(value) > meta["max_len"]:
        raise ConfigError(f"{where} has {len(value)} entries, at most {meta['max_len']} are allowed")


class JSONConfig:
    """Mixin for dataclass configs: typed ``from_dict``/``load`` and atomic ``save``.

    ``LABEL`` names the config in messages (e.g. "T5 config").
    """

    LABEL = "config"

    def __post_init__(self) -> None:
        """Check every field, however the config was made (a file, a converter, code); subclasses call this first."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            where = f"{self.LABEL}: {f.name}"
            value = _check(getattr(self, f.name), hints[f.name], where)
            _check_bounds(value, f.metadata, where)
            object.__setattr__(self, f.name, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None):
        where = where or cls.LABEL
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields), key=str)
        if unknown:
            raise ConfigError(f"{where} has unknown field {str(unknown[0])[:40]!r}: is it a starflow-mlx {cls.LABEL}?")
        hints = typing.get_type_hints(cls)
        values = {}
        for name, value in data.items():  # checked here too, so messages name the file
            values[name] = _check(value, hints[name], f"{where}: {name}")
            _check_bounds(values[name], fields[name].metadata, f"{where}: {name}")
        missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{where} lacks {missing[0]}: it is incomplete")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(read_json(path, cls.LABEL), str(path))
