"""A training directory's records: ``config.yaml`` and ``label_map.json``.

Training writes them beside its checkpoints (``scripts/train.py``,
``scripts/import_torchvision.py``); evaluation, export and predict read them
when no ``--config`` / ``--label_map`` is given. This module is the only code
that knows their names and formats:

    <model_dir>/
        ckpt-N.index, ckpt-N.data-*    # tf.train.Checkpoint(model=..., ...)
        config.yaml                    # fpn_tf.config.to_dict(ExperimentConfig), YAML
        label_map.json                 # LabelMap.to_json(): category ids and names

Both files are written to a temporary file and renamed into place, so a killed
writer never leaves half a record.
"""

from __future__ import annotations

import os

import yaml

from fpn_tf.config import ConfigError, ExperimentConfig, load_config, to_dict
from fpn_tf.data.label_map import LabelMap

CONFIG_FILE = "config.yaml"
LABEL_MAP_FILE = "label_map.json"


def config_file(model_dir: str) -> str:
    """The path of ``model_dir``'s config record (it may not exist)."""
    return os.path.join(model_dir, CONFIG_FILE)


def label_map_file(model_dir: str) -> str:
    """The path of ``model_dir``'s label-map record (it may not exist)."""
    return os.path.join(model_dir, LABEL_MAP_FILE)


def read_config(
    model_dir: str | None,
    config_path: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    required: bool = False,
) -> ExperimentConfig:
    """``config_path``, else ``model_dir/config.yaml``, else the defaults; then overrides.

    Args:
      model_dir: a training directory, or None.
      config_path: an explicit YAML file (or a shipped config's name); wins over
        the directory's record.
      overrides: ``a.b=value`` strings (``fpn_tf.config.load_config``).
      required: raise instead of falling back to the defaults when neither file
        exists (evaluation must not score a model under a config it was not
        trained with).

    Raises:
      ConfigError: naming the file and key of a bad config, or the missing record.
    """
    if not config_path and model_dir and os.path.isfile(config_file(model_dir)):
        config_path = config_file(model_dir)
    if not config_path and required:
        where = config_file(model_dir) if model_dir else "a --config"
        raise ConfigError(f"no --config given and {where} does not exist")
    return load_config(config_path or None, list(overrides or []))


def stored_config(model_dir: str) -> dict | None:
    """``model_dir/config.yaml`` as a checked, complete config dict; None if absent.

    Raises:
      ConfigError: naming the file when the record exists but cannot be read.
    """
    path = config_file(model_dir)
    if not os.path.exists(path):
        return None
    try:
        return to_dict(load_config(path))
    except (ConfigError, OSError) as e:
        raise ConfigError(f"{path}: the training directory's config cannot be read: {e}") from None


def write_config(config: ExperimentConfig, model_dir: str) -> str:
    """Writes ``model_dir/config.yaml`` (temporary file + rename); returns its path."""
    return _write_atomically(config_file(model_dir), yaml.safe_dump(to_dict(config), sort_keys=False))


def read_label_map(model_dir: str | None, label_map_path: str | None = None) -> LabelMap | None:
    """``label_map_path``, else ``model_dir/label_map.json`` if present, else None.

    Raises:
      ValueError: naming the file when it is not a label map.
    """
    if not label_map_path and model_dir and os.path.isfile(label_map_file(model_dir)):
        label_map_path = label_map_file(model_dir)
    if not label_map_path:
        return None
    with open(label_map_path, encoding="utf-8") as f:
        text = f.read()
    try:
        return LabelMap.from_json(text)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{label_map_path}: not a label map ({type(e).__name__}: {e})") from None


def write_label_map(label_map: LabelMap, model_dir: str) -> str:
    """Writes ``model_dir/label_map.json`` (temporary file + rename); returns its path."""
    return _write_atomically(label_map_file(model_dir), label_map.to_json())


def _write_atomically(path: str, text: str) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
