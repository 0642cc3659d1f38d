"""Finding experiment YAMLs: a path, or the name of a config shipped with fpn_tf.

The YAMLs live in the repository's ``configs/`` folder, which setup.py installs
as the package ``fpn_tf.configs`` (``package_dir``), so a non-editable install
carries them too. ``--config configs/demo.yaml`` (a path) and ``--config demo``
(a shipped config's name) both work; a path that exists always wins.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

_PACKAGE = "fpn_tf.configs"


def _config_dirs() -> list:
    """Where shipped configs are: the source tree's configs/ first, then the installed package."""
    dirs: list = []
    root = Path(__file__).resolve().parent.parent
    if (root / "setup.py").is_file() and (root / "configs").is_dir():
        dirs.append(root / "configs")  # a source checkout (also under PYTHONPATH / editable installs)
    try:
        dirs.append(importlib.resources.files(_PACKAGE))
    except ModuleNotFoundError:
        pass
    return dirs


def packaged_config_names() -> list[str]:
    """Names of the shipped configs ("demo", "faster_rcnn_r50_fpn_coco", ...), sorted."""
    names = set()
    for directory in _config_dirs():
        names.update(p.name[: -len(".yaml")] for p in directory.iterdir() if p.name.endswith(".yaml"))
    return sorted(names)


def resolve_config_path(name_or_path: str | os.PathLike) -> str:
    """The file to read for ``name_or_path``: itself if it exists, else a shipped config.

    A shipped config is looked up by bare name, with or without ``.yaml``
    ("demo", "demo.yaml"); a name with a directory part must exist as given.
    Raises FileNotFoundError naming the path and the shipped configs otherwise.
    """
    path = os.fspath(name_or_path)
    if os.path.exists(path):
        return path
    if os.sep not in path and "/" not in path:
        file_name = path if path.endswith(".yaml") else path + ".yaml"
        for directory in _config_dirs():
            candidate = directory / file_name
            if candidate.is_file():
                return str(candidate)
    raise FileNotFoundError(
        f"config {path!r} is neither an existing file nor a shipped config; shipped configs: "
        f"{', '.join(packaged_config_names()) or 'none found'}"
    )
