"""ImageNet initialisation from the Keras applications ResNet weight files.

``load_keras_applications_backbone(model, path)`` reads
``resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`` (or the ``resnet101`` /
``resnet152`` file, with or without the top) by layer name and writes it into the
ResNet body of an fpn_tf model. The files cannot be downloaded here; get them
from ``https://storage.googleapis.com/tensorflow/keras-applications/resnet/<file>``
(``keras.applications.ResNet50(weights="imagenet")`` caches it in
``~/.keras/models/``, which is where ``path=None`` looks).

Keras applications' ResNet is not torchvision's, and this import is an
*initialisation*, not the same network:

* **stride placement**: Keras puts the stride-2 of ``conv3``..``conv5`` block 1
  on the first 1×1 conv (ResNet v1), fpn_tf on the 3×3 conv (v1.5,
  torchvision). The kernels have the same shapes and are copied as they are, so
  stem and ``layer1`` compute exactly what Keras computes, while ``layer2``..
  ``layer4`` see their first block's stride in another place;
* **conv biases**: every Keras conv has a bias, fpn_tf's have none. Each conv is
  followed by a batch norm, so the bias is folded into it exactly:
  ``BN(conv(x) + b) = BN'(conv(x))`` with ``moving_mean' = moving_mean - b``;
* **BN epsilon**: Keras uses 1.001e-5; the statistics are moved so the fpn_tf
  layer's own epsilon gives the same scale:
  ``moving_variance' = moving_variance + 1.001e-5 - epsilon`` (floored at 0);
* **preprocessing**: the Keras weights expect "caffe" input (BGR, minus the mean
  (103.939, 116.779, 123.68), no scaling), fpn_tf feeds RGB ``(x - mean) / std``.
  ``conv1``'s kernel gets its input channels reversed and multiplied by ``std``,
  and ``conv1 (mean - caffe mean)`` is folded into its bias (then into ``bn1``):
  exact except within ``conv1``'s padding of the image border, where Keras pads
  ``x - caffe_mean`` with zeros and fpn_tf pads ``(x - mean) / std``.

Layer names: ``conv1_conv``/``conv1_bn`` -> ``conv1``/``bn1``;
``conv{s}_block{b}_{i}_conv``/``_bn`` -> ``layer{s-1}_{b-1}_conv{i}``/``bn{i}``
(i = 1, 2, 3) and ``..._0_conv``/``_0_bn`` -> ``downsample_0``/``downsample_1``.
Both the Keras 2 (``layer_names`` / ``weight_names`` attributes, the published
files) and the Keras 3 (``model.save_weights("x.weights.h5")``) layouts are read.
"""

from __future__ import annotations

import os
import re

import h5py
import keras
import numpy as np

from fpn_tf.config import InputConfig
from fpn_tf.models.weights_torchvision import ImportResult, WeightImportError, _find_resnet

KERAS_BN_EPSILON = 1.001e-5
# keras.applications.imagenet_utils "caffe" mode: BGR mean, as RGB here.
CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)
WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
_CONV_PARAMS = ("kernel", "bias")
_BN_PARAMS = ("gamma", "beta", "moving_mean", "moving_variance")
_BLOCK = re.compile(r"^conv(\d)_block(\d+)_(\d)_(conv|bn)$")
_TOP_LAYERS = ("predictions", "probs", "fc1000")


def weights_file_name(depth: int = 50, include_top: bool = False) -> str:
    """The Keras applications file name, e.g. ``resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5``."""
    return f"resnet{depth}_weights_tf_dim_ordering_tf_kernels{'' if include_top else '_notop'}.h5"


def _default_path(depth: int) -> str:
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return os.path.join(home, "models", weights_file_name(depth))


def _open_h5(path: str) -> h5py.File:
    """``h5py.File(path, "r")``; errors name the path (h5py's say "file signature not found")."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Keras weights file not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise WeightImportError(f"{path} is not a readable HDF5 (.h5) weights file: {e}") from None


def check_h5_file(path: str) -> None:
    """Raises FileNotFoundError / WeightImportError naming ``path`` unless it opens as HDF5.

    For callers that hand the file to Keras' ``load_weights`` (``*.weights.h5``),
    whose error from h5py names no file.
    """
    _open_h5(path).close()


def read_keras_h5(path: str) -> dict[str, dict[str, np.ndarray]]:
    """``{layer name: {param name: array}}`` of a Keras weights file (Keras 2 or 3 layout)."""
    layers: dict[str, dict[str, np.ndarray]] = {}
    with _open_h5(path) as f:
        root = f["model_weights"] if "model_weights" in f else f  # a full-model .h5
        if "layer_names" in root.attrs:  # Keras 2 layout
            for raw in root.attrs["layer_names"]:
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
                group = root[name]
                params = {}
                for wraw in group.attrs.get("weight_names", []):
                    wname = wraw.decode() if isinstance(wraw, bytes) else str(wraw)
                    params[wname.split("/")[-1].split(":")[0]] = np.asarray(group[wname])
                if params:
                    layers[name] = params
        elif "layers" in root:  # Keras 3 layout: layers/<auto name>/vars/<index>, attrs name
            for group in root["layers"].values():
                vars_ = group.get("vars")
                if vars_ is None or not len(vars_):
                    continue
                name = vars_.attrs.get("name", "")
                name = name.decode() if isinstance(name, bytes) else str(name)
                order = _BN_PARAMS if name.endswith("_bn") else _CONV_PARAMS
                arrays = [np.asarray(vars_[str(i)]) for i in range(len(vars_))]
                layers[name] = dict(zip(order, arrays))
        else:
            raise WeightImportError(
                f"{path} is not a Keras weights file (no 'layer_names' attribute or 'layers' group)"
            )
    return layers


def _target_name(keras_name: str) -> tuple[str, str] | None:
    """(fpn_tf conv name, fpn_tf norm name) of a Keras conv/bn pair prefix, or None."""
    if keras_name in ("conv1_conv", "conv1_bn"):
        return "conv1", "bn1"
    m = _BLOCK.match(keras_name)
    if not m:
        return None
    stage, block, index = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if not 2 <= stage <= 5:
        return None
    prefix = f"layer{stage - 1}_{block - 1}"
    if index == 0:
        return f"{prefix}_downsample_0", f"{prefix}_downsample_1"
    return f"{prefix}_conv{index}", f"{prefix}_bn{index}"


def load_keras_applications_backbone(
    model_or_backbone,
    path: str | None = None,
    pixel_mean: tuple[float, ...] | None = None,
    pixel_std: tuple[float, ...] | None = None,
) -> ImportResult:
    """Initialises an fpn_tf ResNet body from a Keras applications ImageNet file.

    Args:
      model_or_backbone: a FasterRCNN, an FPN backbone or a ResNet
        (``build_resnet``) of the file's depth (50, 101 or 152) and width 1.
      path: the ``.h5`` file; None looks for ``weights_file_name(depth)`` in
        ``$KERAS_HOME/models`` (default ``~/.keras/models``).
      pixel_mean, pixel_std: the RGB normalisation the model applies (0..255
        scale); default: a FasterRCNN's ``config.input``, else ``InputConfig()``'s.

    Returns:
      ImportResult: ``loaded`` lists the Keras layers used, ``ignored`` the
      classifier layers of a with-top file.

    Raises:
      FileNotFoundError naming the file and where to get it; WeightImportError
      naming missing / unexpected layers and shape mismatches (nothing is
      assigned then).

    Long because it walks the file's layers once, mapping and checking each in place
    (the error for a mismatch names the layer being read).
    """
    resnet = _find_resnet(model_or_backbone)
    names = {layer.name for layer in resnet.layers}
    if "layer1_0_conv3" not in names:
        raise WeightImportError(
            f"{resnet.name!r} is built of basic blocks; Keras applications has bottleneck "
            "ResNets only (50/101/152)"
        )
    depth = {6: 50, 23: 101, 36: 152}.get(
        sum(n.startswith("layer3_") and n.endswith("_conv1") for n in names)
    )
    if path is None:
        path = _default_path(depth or 50)
    if not os.path.exists(path):
        file_name = os.path.basename(path) if path.endswith(".h5") else weights_file_name(depth or 50)
        raise FileNotFoundError(
            f"Keras applications weights not found at {path}. Download {file_name} from "
            f"{WEIGHTS_URL}{file_name} (it cannot be fetched from this sandbox) and pass its path."
        )
    config = getattr(model_or_backbone, "config", None)
    inputs = config.input if config is not None and hasattr(config, "input") else InputConfig()
    mean = np.asarray(pixel_mean if pixel_mean is not None else inputs.pixel_mean, np.float64)
    std = np.asarray(pixel_std if pixel_std is not None else inputs.pixel_std, np.float64)

    source = read_keras_h5(path)
    ignored = sorted(n for n in source if n in _TOP_LAYERS)
    pairs: dict[tuple[str, str], dict[str, dict]] = {}
    unexpected = []
    for name, params in source.items():
        if name in ignored:
            continue
        target = _target_name(name)
        if target is None:
            unexpected.append(name)
            continue
        pairs.setdefault(target, {})["conv" if name.endswith("_conv") else "bn"] = params

    missing, mismatched, values = [], [], []
    for layer in resnet.layers:
        if not isinstance(layer, keras.layers.Conv2D):
            continue
        norm_name = "bn1" if layer.name == "conv1" else re.sub(r"conv(\d)$", r"bn\1", layer.name)
        if layer.name.endswith("downsample_0"):
            norm_name = layer.name[: -len("0")] + "1"
        found = pairs.pop((layer.name, norm_name), {})
        if "conv" not in found or "bn" not in found:
            missing.append(f"{layer.name}/{norm_name}")
            continue
        norm = resnet.get_layer(norm_name)
        kernel = found["conv"]["kernel"].astype(np.float64)
        bias = found["conv"].get("bias", np.zeros(kernel.shape[-1])).astype(np.float64)
        if kernel.shape != tuple(layer.kernel.shape):
            mismatched.append(
                f"{layer.name}: file kernel {kernel.shape} vs model {tuple(layer.kernel.shape)}"
            )
            continue
        if layer.name == "conv1":
            kernel = kernel[:, :, ::-1, :]  # BGR -> RGB input channels
            bias = bias + np.einsum("hwio,i->o", kernel, mean - np.asarray(CAFFE_MEAN_RGB))
            kernel = kernel * std[None, None, :, None]
        bn = found["bn"]
        epsilon = float(getattr(norm, "epsilon", 1e-5))
        folded = {
            "gamma": bn["gamma"],
            "beta": bn["beta"],
            "moving_mean": bn["moving_mean"] - bias,
            "moving_variance": np.maximum(bn["moving_variance"] + KERAS_BN_EPSILON - epsilon, 0.0),
        }
        if folded["gamma"].shape != tuple(norm.gamma.shape):
            mismatched.append(f"{norm_name}: file {folded['gamma'].shape} vs model {tuple(norm.gamma.shape)}")
            continue
        values.append((layer.kernel, kernel))
        values += [(getattr(norm, k), v) for k, v in folded.items()]
    unexpected += [f"{c}/{n}" for c, n in pairs]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"layers not in the file: {', '.join(missing)}")
        if unexpected:
            parts.append(f"file layers with no counterpart: {', '.join(sorted(unexpected))}")
        if mismatched:
            parts.append(f"shape mismatches: {'; '.join(mismatched)}")
        raise WeightImportError(f"cannot import {path} into {resnet.name!r}: " + " | ".join(parts))
    for variable, value in values:
        variable.assign(np.asarray(value, dtype=variable.dtype))
    loaded = sorted(n for n in source if n not in ignored)
    return ImportResult(loaded=loaded, ignored=ignored)
