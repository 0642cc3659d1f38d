"""ImageNet backbone init: Keras applications .h5 files and torchvision ResNet state dicts.

The weight files are written by the tests (nothing can be downloaded here): a
``keras.applications.ResNet50(weights=None)`` with randomised weights saved in
both the Keras 2 layout (the published files) and the Keras 3 layout.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format

from fpn_tf.config import BackboneConfig
from fpn_tf.models.fpn_backbone import build_fpn_backbone
from fpn_tf.models.resnet import build_resnet
from fpn_tf.models.weights_keras_applications import (
    CAFFE_MEAN_RGB,
    KERAS_BN_EPSILON,
    load_keras_applications_backbone,
    read_keras_h5,
    weights_file_name,
)
from fpn_tf.models.weights_torchvision import WeightImportError, load_torchvision_backbone

IMAGENET_MEAN = (123.675, 116.28, 103.53)


def _np(x) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


IMAGENET_STD = (58.395, 57.12, 57.375)


def _randomise(model: keras.Model, seed: int = 0) -> None:
    """Non-trivial values everywhere, incl. conv biases and BN statistics."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            fan_in = np.prod(layer.kernel.shape[:3])
            layer.kernel.assign(rng.normal(0, np.sqrt(2.0 / fan_in), layer.kernel.shape).astype("float32"))
            layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape).astype("float32"))
        elif isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.1, n).astype("float32"))
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))


@pytest.fixture(scope="module")
def keras_resnet50(tmp_path_factory):
    """(model, Keras 2 layout path, Keras 3 layout path)."""
    model = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(128, 128, 3))
    _randomise(model)
    folder = tmp_path_factory.mktemp("keras_apps")
    legacy = folder / weights_file_name(50)
    native = folder / "resnet50.weights.h5"
    with h5py.File(legacy, "w") as f, warnings.catch_warnings():
        # Keras' own writers convert each variable with np.array(copy=False).
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
        model.save_weights(native)
    return model, str(legacy), str(native)


@pytest.fixture(scope="module")
def fpn_tf_resnet50():
    return build_resnet(BackboneConfig(name="resnet50", bn_epsilon=1e-5))


def test_both_file_layouts_read_the_same(keras_resnet50):
    model, legacy, native = keras_resnet50
    a, b = read_keras_h5(legacy), read_keras_h5(native)
    assert sorted(a) == sorted(b)
    assert len(a) == 53 * 2  # 53 convs (incl. 4 shortcuts), each with a BN
    for name in a:
        assert sorted(a[name]) == sorted(b[name])
        for param in a[name]:
            np.testing.assert_array_equal(a[name][param], b[name][param])
    np.testing.assert_array_equal(
        a["conv3_block1_2_conv"]["kernel"], _np(model.get_layer("conv3_block1_2_conv").kernel)
    )


@pytest.mark.parametrize("layout", ["legacy", "native"])
def test_values_land_with_biases_folded(keras_resnet50, fpn_tf_resnet50, layout):
    model, legacy, native = keras_resnet50
    ours = fpn_tf_resnet50
    result = load_keras_applications_backbone(ours, legacy if layout == "legacy" else native)
    assert len(result.loaded) == 106 and result.ignored == []

    pairs = {
        "conv2_block1_1": ("layer1_0_conv1", "layer1_0_bn1"),
        "conv3_block1_2": ("layer2_0_conv2", "layer2_0_bn2"),
        "conv4_block6_3": ("layer3_5_conv3", "layer3_5_bn3"),
        "conv5_block1_0": ("layer4_0_downsample_0", "layer4_0_downsample_1"),
    }
    for k_name, (conv, bn) in pairs.items():
        kc, kb = model.get_layer(f"{k_name}_conv"), model.get_layer(f"{k_name}_bn")
        np.testing.assert_array_equal(_np(ours.get_layer(conv).kernel), _np(kc.kernel))
        norm = ours.get_layer(bn)
        np.testing.assert_array_equal(_np(norm.gamma), _np(kb.gamma))
        np.testing.assert_array_equal(_np(norm.beta), _np(kb.beta))
        np.testing.assert_allclose(_np(norm.moving_mean), _np(kb.moving_mean) - _np(kc.bias), atol=1e-7)
        np.testing.assert_allclose(
            _np(norm.moving_variance), _np(kb.moving_variance) + KERAS_BN_EPSILON - 1e-5, rtol=1e-6
        )
    # The stem: RGB order and std folded into the kernel.
    k = _np(model.get_layer("conv1_conv").kernel)
    np.testing.assert_allclose(
        _np(ours.get_layer("conv1").kernel),
        k[:, :, ::-1, :] * np.asarray(IMAGENET_STD)[None, None, :, None],
        rtol=1e-6,
    )


def _stem_and_layer1(model_keras, ours, pixels, mean):
    """Keras conv2 stage output (caffe input) and fpn_tf C2 (normalised input)."""
    keras_c2 = keras.Model(model_keras.input, model_keras.get_layer("conv2_block3_out").output)
    caffe = keras.applications.resnet.preprocess_input(pixels.copy())
    expected = np.asarray(keras_c2(caffe))
    got = np.asarray(ours((pixels - np.asarray(mean)) / np.asarray(IMAGENET_STD))["C2"])
    return expected, got


def test_stem_and_layer1_compute_what_keras_computes(keras_resnet50, fpn_tf_resnet50):
    """Stem + layer1 have the same strides in both layouts: the import is exact there."""
    model, legacy, _ = keras_resnet50
    pixels = np.random.default_rng(1).uniform(0, 255, (1, 128, 128, 3)).astype("float32")
    # With the caffe mean as the model's mean the fold is exact everywhere ...
    load_keras_applications_backbone(
        fpn_tf_resnet50, legacy, pixel_mean=CAFFE_MEAN_RGB, pixel_std=IMAGENET_STD
    )
    expected, got = _stem_and_layer1(model, fpn_tf_resnet50, pixels, CAFFE_MEAN_RGB)
    scale = np.abs(expected).max()
    assert scale > 1.0
    np.testing.assert_allclose(got, expected, atol=2e-5 * scale)
    # ... with ImageNet's, everywhere but next to the border (conv1's zero padding).
    load_keras_applications_backbone(fpn_tf_resnet50, legacy)
    expected, got = _stem_and_layer1(model, fpn_tf_resnet50, pixels, IMAGENET_MEAN)
    inner = (slice(None), slice(6, -6), slice(6, -6))
    np.testing.assert_allclose(got[inner], expected[inner], atol=2e-5 * scale)
    assert np.abs(got - expected).max() < 0.05 * scale


def test_fpn_backbone_and_defaults(keras_resnet50, tmp_path, monkeypatch):
    _, legacy, _ = keras_resnet50
    backbone = build_fpn_backbone(BackboneConfig(name="resnet50"))
    result = load_keras_applications_backbone(backbone, legacy)
    assert "conv1_conv" in result.loaded
    # path=None looks in $KERAS_HOME/models and names the file and the URL when absent.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5.*storage"
    ):
        load_keras_applications_backbone(backbone)


def test_wrong_depth_names_the_layers(keras_resnet50):
    _, legacy, _ = keras_resnet50
    r101 = build_resnet(BackboneConfig(name="resnet101"))
    before = _np(r101.get_layer("conv1").kernel).copy()
    with pytest.raises(WeightImportError, match="layers not in the file: .*layer3_6_conv1/layer3_6_bn1"):
        load_keras_applications_backbone(r101, legacy)
    np.testing.assert_array_equal(_np(r101.get_layer("conv1").kernel), before)  # untouched
    with pytest.raises(WeightImportError, match="basic blocks"):
        load_keras_applications_backbone(
            build_resnet(BackboneConfig(name="resnet18", width_multiplier=0.25)), legacy
        )


# ------------------------------------------------------------------ torchvision ResNet (no torch needed)
def _torchvision_resnet_state_dict(resnet: keras.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """A state dict in torchvision's resnet layout, made from an fpn_tf ResNet's names."""
    rng = np.random.default_rng(seed)
    state = {}
    for layer in resnet.layers:
        key = layer.name.replace("_", ".")
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, i, o = layer.kernel.shape
            state[f"{key}.weight"] = rng.normal(0, 0.1, (o, i, kh, kw)).astype("float32")
        elif layer.weights:
            n = layer.gamma.shape[0]
            state[f"{key}.weight"] = rng.uniform(0.5, 1.5, n).astype("float32")
            state[f"{key}.bias"] = rng.normal(0, 0.1, n).astype("float32")
            state[f"{key}.running_mean"] = rng.normal(0, 0.1, n).astype("float32")
            state[f"{key}.running_var"] = rng.uniform(0.5, 2.0, n).astype("float32")
            state[f"{key}.num_batches_tracked"] = np.asarray(100, np.int64)
    state["fc.weight"] = rng.normal(0, 0.01, (1000, 64 * 8)).astype("float32")
    state["fc.bias"] = np.zeros(1000, "float32")
    return state


def test_torchvision_resnet_npz(tmp_path):
    cfg = BackboneConfig(name="resnet18", width_multiplier=0.25)
    backbone = build_fpn_backbone(cfg)
    resnet = backbone.get_layer("resnet18")
    state = _torchvision_resnet_state_dict(resnet)
    path = tmp_path / "resnet18.npz"
    np.savez(path, **state)
    result = load_torchvision_backbone(backbone, str(path))
    assert "fc.weight" in result.ignored and "bn1.num_batches_tracked" in result.ignored
    assert len(result.loaded) == sum(1 for k in state if not k.startswith("fc.") and "num_batches" not in k)
    np.testing.assert_array_equal(
        _np(resnet.get_layer("layer2_0_conv2").kernel), state["layer2.0.conv2.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        _np(resnet.get_layer("layer3_0_downsample_1").moving_variance),
        state["layer3.0.downsample.1.running_var"],
    )

    # Every offending key is named, and nothing is assigned.
    bad = dict(state)
    del bad["layer4.1.bn2.weight"]
    bad["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), "float32")
    bad["conv1.weight"] = np.zeros((16, 3, 5, 5), "float32")
    with pytest.raises(WeightImportError) as info:
        load_torchvision_backbone(resnet, bad)
    message = str(info.value)
    assert "missing key(s)" in message and "layer4.1.bn2.weight" in message
    assert "unexpected key(s)" in message and "layer5.0.conv1.weight" in message
    assert "conv1.weight: state dict shape (16, 3, 5, 5)" in message
    np.testing.assert_array_equal(
        _np(resnet.get_layer("conv1").kernel), state["conv1.weight"].transpose(2, 3, 1, 0)
    )


RESNET_SCRIPT = """
import sys
import numpy as np
import torch
import torchvision

torch.manual_seed(0)
net = torchvision.models.resnet18(weights=None).eval()
with torch.no_grad():
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), sys.argv[1])
    x = torch.from_numpy(np.load(sys.argv[2])).permute(0, 3, 1, 2)
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    out = {}
    for k, layer in enumerate([net.layer1, net.layer2, net.layer3, net.layer4]):
        x = layer(x)
        out[f"C{k + 2}"] = x.permute(0, 2, 3, 1).numpy()
np.savez(sys.argv[3], **out)
"""


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="torchvision is not installed (optional extra fpn_tf[torch]); the parity check needs it",
)
def test_torchvision_resnet_pth_matches_torchvision(tmp_path):
    """A real torchvision resnet18 state dict (.pth with fc.* and num_batches_tracked) gives
    torchvision's C2..C5. torchvision runs in a subprocess: importing it after TensorFlow crashes."""
    image = np.random.default_rng(4).normal(size=(1, 67, 93, 3)).astype("float32")
    np.save(tmp_path / "x.npy", image)
    subprocess.run(
        [
            sys.executable,
            "-c",
            RESNET_SCRIPT,
            str(tmp_path / "r18.pth"),
            str(tmp_path / "x.npy"),
            str(tmp_path / "c.npz"),
        ],
        check=True,
        timeout=300,
    )
    expected = np.load(tmp_path / "c.npz")
    resnet = build_resnet(BackboneConfig(name="resnet18", bn_epsilon=1e-5))
    result = load_torchvision_backbone(resnet, str(tmp_path / "r18.pth"))
    assert "fc.weight" in result.ignored and "layer1.0.bn1.num_batches_tracked" in result.ignored
    got = resnet(image)
    for level in ("C2", "C3", "C4", "C5"):
        assert got[level].shape == expected[level].shape, level
        scale = np.abs(expected[level]).max()
        np.testing.assert_allclose(_np(got[level]), expected[level], atol=1e-5 * scale, err_msg=level)
