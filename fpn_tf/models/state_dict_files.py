"""Reading a weights file that a user hands us: a torch ``.pth`` / ``.pt`` or a NumPy ``.npz``.

Files are data, never code: ``torch.load(..., weights_only=True)`` and
``np.load(allow_pickle=False)``. A missing, corrupt or truncated file raises an error
naming its path; the importers (``weights_torchvision*``, ``weights_keras_applications``)
report what does not fit the model with ``WeightImportError`` and ``ImportResult``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import numpy as np


class WeightImportError(ValueError):
    """A state dict that does not fit the model: lists every offending key."""


@dataclasses.dataclass
class ImportResult:
    """What an import did: the state-dict keys loaded, and those skipped on purpose."""

    loaded: list[str]
    ignored: list[str]


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor (bfloat16 has no numpy dtype)
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _load_pth(path: str) -> Mapping:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs PyTorch (pip install 'fpn_tf[torch]'); without it, convert the "
            "state dict to .npz once elsewhere: np.savez(out, **{k: v.numpy() for k, v in sd.items()})"
        ) from e
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_weights_file(path: str) -> Mapping:
    """A .npz / .pth file's mapping; a corrupt or truncated file raises WeightImportError naming it."""
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        return _load_pth(path)
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile, pickle, torch and numpy all raise their own
        kind = "numpy .npz" if path.endswith(".npz") else "PyTorch"
        raise WeightImportError(
            f"{path} is not a readable {kind} state dict (corrupt, truncated or another format): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def read_state_dict(source) -> dict[str, np.ndarray]:
    """A torchvision state dict as ``{key: numpy array}``.

    Args:
      source: a path to a ``.pth`` / ``.pt`` file (``torch.load(weights_only=True)``)
        or a ``.npz`` file (``np.load(allow_pickle=False)``), or a mapping of
        key -> torch tensor / numpy array. A training checkpoint holding the state
        dict under ``"model"`` or ``"state_dict"`` (torchvision's reference
        scripts) is unwrapped, and a ``"module."`` prefix (DistributedDataParallel)
        is removed from every key.

    Raises:
      FileNotFoundError naming the path; WeightImportError naming the path of a
      corrupt or truncated file; ValueError for an unknown file type or content
      that is not a mapping of arrays (naming the path or the key).
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"state dict file not found: {path}")
        if path.endswith((".npz", ".pth", ".pt", ".bin")):
            state = _read_weights_file(path)
        else:
            raise ValueError(f"{path}: expected a .pth / .pt (PyTorch) or .npz (numpy) file")
    else:
        path, state = None, source
    if not isinstance(state, Mapping):
        where = f"{path}: " if path else ""
        raise ValueError(
            f"{where}a state dict must be a mapping of name -> tensor, got {type(state).__name__}"
        )
    for wrapper in ("model", "state_dict"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
            break
    out = {}
    for key, value in state.items():
        key = str(key)
        if key.startswith("module."):
            key = key[len("module.") :]
        try:
            out[key] = _to_numpy(value)
        except Exception as e:  # noqa: BLE001 - name the key whatever went wrong
            raise ValueError(f"state dict entry {key!r} is not an array ({type(value).__name__}): {e}") from e
    return out


# ---------------------------------------------------------------- transforms
# Each mapping is a pair (torchvision -> fpn_tf, fpn_tf -> torchvision).
