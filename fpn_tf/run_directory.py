"""A training directory's records: ``config.yaml`` and ``label_map.json``.

Training writes them beside its checkpoints (``scripts/train.py``,
``scripts/import_torchvision.py``); evaluation, export and predict read them
when no ``--config`` / ``--label_map`` is given. This module is the only code
that knows their names and formats:

    <model_dir>/
        ckpt-N.index, ckpt-N.data-*    # tf.train.Checkpoint(model=..., ...)
        config.yaml                    # fpn_tf.config.to_dict(ExperimentConfig), YAML
        label_map.json                 # LabelMap.to_json(): category ids and names
        train.lock                     # {"pid", "host", "started"} while a run trains here

Both records are written to a temporary file and renamed into place, so a killed
writer never leaves half a record. ``training_lock`` keeps a second run off a
directory that one is training into (interleaved checkpoints and input positions
otherwise); a lock left by a process that died on this host is replaced, loudly.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket

import yaml
from absl import logging

from fpn_tf.config import ConfigError, ExperimentConfig, load_config, to_dict
from fpn_tf.data.label_map import LabelMap

CONFIG_FILE = "config.yaml"
LABEL_MAP_FILE = "label_map.json"
LOCK_FILE = "train.lock"


class DirectoryLockedError(RuntimeError):
    """Another live run holds the training directory's lock."""


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def training_lock(model_dir: str, enabled: bool = True):
    """Holds ``model_dir/train.lock`` for the duration (``enabled=False``: a no-op, for
    the non-chief workers of a multi-worker run, which write nothing there).

    Raises:
      DirectoryLockedError: naming the holder's pid, host and start time when a live
        process (or one on another host, whose liveness cannot be checked) holds it.
    """
    if not enabled:
        yield
        return
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, LOCK_FILE)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.datetime.now().isoformat()}
    tmp = f"{path}.{mine['pid']}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(mine, f)
    try:
        for _ in range(2):  # the second try follows the removal of a stale lock
            try:
                _create_from(tmp, path)
                break
            except FileExistsError:
                holder = _read_lock(path)
            pid, same_host = holder.get("pid"), holder.get("host") == mine["host"]
            if same_host and isinstance(pid, int) and pid != mine["pid"] and not _alive(pid):
                logging.warning(
                    "%s: replacing a stale lock of pid %s (started %s), which is no longer running",
                    path, pid, holder.get("started"),
                )  # fmt: skip
                os.remove(path)
                continue
            if same_host and pid == mine["pid"]:
                raise DirectoryLockedError(
                    f"{path}: this process (pid {pid}) is already training into {model_dir}"
                )
            raise DirectoryLockedError(
                f"{model_dir} is being trained into by pid {pid} on {holder.get('host')} "
                f"(since {holder.get('started')}; {path}). Wait for it, stop it, or train into another "
                "model_dir; if that run is dead (e.g. on another machine), delete the lock file."
            )
        else:  # a lock re-created between the stale one's removal and our link
            raise DirectoryLockedError(f"{path}: another run took the lock while a stale one was replaced")
    finally:
        os.remove(tmp)
    try:
        yield
    finally:
        if _read_lock(path).get("pid") == mine["pid"]:
            os.remove(path)


def _create_from(tmp: str, path: str) -> None:
    """Creates ``path`` with ``tmp``'s content if it does not exist (FileExistsError if it does).

    A hard link makes the lock appear whole or not at all; where the filesystem has no
    hard links, an exclusive create + write (a killed writer may leave it empty: then
    the message says to delete it).
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f, open(tmp, encoding="utf-8") as source:
            f.write(source.read())


def _read_lock(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}  # unreadable (e.g. half written by a killed run): no live holder is known
