"""Damaged weight files handed to --init_checkpoint / the importers: every error names the
file, and the file is left as it was."""

from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np
import pytest

from fpn_tf.checkpoints import load_init_checkpoint
from fpn_tf.config import BackboneConfig
from fpn_tf.models.resnet import build_resnet
from fpn_tf.models.weights_keras_applications import check_h5_file, read_keras_h5
from fpn_tf.models.weights_torchvision import WeightImportError, read_state_dict


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def narrow_r50():
    return build_resnet(BackboneConfig(name="resnet50", width_multiplier=0.125))


@pytest.fixture(scope="module")
def narrow_r18():
    return build_resnet(BackboneConfig(name="resnet18", width_multiplier=0.125))


@pytest.mark.parametrize("content", [b"", b"not an hdf5 file at all", b"\x89HDF\r\n\x1a\n truncated"])
def test_fault_non_hdf5_h5_init_file_is_named(tmp_path, narrow_r50, content):
    """--init_checkpoint x.h5 that is not HDF5 -> WeightImportError naming the path (not h5py's bare text)."""
    path = tmp_path / "resnet50_notop.h5"
    path.write_bytes(content)
    before = _sha(path)
    with pytest.raises(WeightImportError) as e:
        load_init_checkpoint(narrow_r50, str(path))
    assert str(path) in str(e.value) and "not a readable HDF5" in str(e.value)
    with pytest.raises(WeightImportError, match="resnet50_notop.h5"):
        read_keras_h5(str(path))
    # *.weights.h5 goes to Keras' load_weights (trainer.load_init_checkpoint); check_h5_file
    # is the check a caller runs first so the error names the file.
    with pytest.raises(WeightImportError, match="resnet50_notop.h5"):
        check_h5_file(str(path))
    with pytest.raises(FileNotFoundError, match="nope.weights.h5"):
        check_h5_file(str(tmp_path / "nope.weights.h5"))
    assert _sha(path) == before


def _npz_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{"conv1.weight": np.ones((8, 3, 7, 7), np.float32), "bn1.weight": np.ones(8, np.float32)})
    return buf.getvalue()


def _npz_with_object_array(path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        z.writestr("conv1.weight.npy", buf.getvalue())


@pytest.mark.parametrize(
    "name, make",
    [
        ("random.npz", lambda p: p.write_bytes(b"\x00\x01garbage" * 50)),
        ("truncated.npz", lambda p: p.write_bytes(_npz_bytes()[:300])),
        ("pickled.npz", _npz_with_object_array),
        ("random.pth", lambda p: p.write_bytes(b"garbage bytes, no zip, no pickle")),
        ("truncated.pth", lambda p: p.write_bytes(b"PK\x03\x04" + b"\x00" * 40)),
    ],
)
def test_fault_corrupt_torchvision_weights_are_named(tmp_path, narrow_r18, name, make):
    """Corrupt / truncated / pickled .npz or .pth -> WeightImportError naming the path, file untouched."""
    if name.endswith(".pth"):
        pytest.importorskip("torch", reason="reading .pth files needs PyTorch (optional extra fpn_tf[torch])")
    path = tmp_path / name
    make(path)
    before = _sha(path)
    with pytest.raises(WeightImportError) as e:
        read_state_dict(str(path))
    assert str(path) in str(e.value) and "not a readable" in str(e.value)
    with pytest.raises(WeightImportError, match=name):
        load_init_checkpoint(narrow_r18, str(path))
    assert _sha(path) == before


def test_fault_pth_holding_a_list_is_named(tmp_path):
    """.pth whose content is not a mapping -> ValueError naming the path."""
    torch = pytest.importorskip("torch", reason="reading .pth files needs PyTorch")
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match=f"{path}: a state dict must be a mapping"):
        read_state_dict(str(path))
