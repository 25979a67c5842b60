"""PEP 517 build backend: setuptools' own, plus ``starflow_mlx_blas.pth`` at the root of every wheel.

A ``.pth`` file must sit directly in site-packages to run at interpreter start-up.
setuptools puts package files there for regular wheels but writes only its own
``.pth`` into editable ones, so both ``build_wheel`` and ``build_editable`` add the
file to the finished wheel here (with its RECORD line) and pip installs it like
any other file, and removes it on uninstall. The line imports ``starflow_mlx``,
which registers the hook of ``starflow_mlx/blas.py`` (see there for why).
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403 (every other hook is setuptools')

PTH_NAME = "starflow_mlx_blas.pth"
PTH_TEXT = "import starflow_mlx  # Linux: loads a fast BLAS before mlx (starflow_mlx/blas.py)\n"


def add_to_wheel(wheel: str, name: str, data: bytes) -> None:
    """Rewrite ``wheel`` with ``name`` at its root and a matching RECORD line."""
    tmp = wheel + ".tmp"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record = next(i.filename for i in src.infolist() if i.filename.endswith(".dist-info/RECORD"))
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        for info in src.infolist():
            if info.filename == name:
                continue
            body = src.read(info.filename)
            if info.filename == record:
                body += f"{name},sha256={digest},{len(data)}\n".encode()
            dst.writestr(info, body)
        dst.writestr(name, data)
    os.replace(tmp, wheel)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    add_to_wheel(os.path.join(wheel_directory, name), PTH_NAME, PTH_TEXT.encode())
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    add_to_wheel(os.path.join(wheel_directory, name), PTH_NAME, PTH_TEXT.encode())
    return name
