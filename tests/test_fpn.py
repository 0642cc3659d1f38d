"""FPN layers (fpn_tf/layers/fpn.py) and the ResNet + FPN backbone (fpn_tf/models/fpn_backbone.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.config import BackboneConfig, FPNConfig
from fpn_tf.layers.fpn import (
    ConvExtraLevels,
    FeaturePyramid,
    LateralConnection,
    MaxPoolP6,
    Smoothing,
    TopDownMerge,
)
from fpn_tf.models.fpn_backbone import build_fpn_backbone, fpn_output_specs

NARROW = BackboneConfig(name="resnet18", width_multiplier=0.25)  # C2..C5: 16, 32, 64, 128 channels


def _conv_same(x, layer):
    """Reference: stride-1 conv with PyTorch's symmetric padding, plus bias."""
    kernel, bias = (w.numpy() for w in layer.conv.weights)
    p = (kernel.shape[0] - 1) // 2
    return tf.nn.conv2d(x, kernel, 1, [[0, 0], [p, p], [p, p], [0, 0]]).numpy() + bias


def _up(x, height, width):
    return np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)[:, :height, :width]


def _features(rng, channels=(4, 8, 16, 32), sizes=((13, 11), (7, 6), (4, 3), (2, 2))):
    return {
        f"C{k + 2}": rng.normal(size=(2, h, w, c)).astype("float32")
        for k, (c, (h, w)) in enumerate(zip(channels, sizes))
    }


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize(
    "layer",
    [
        LateralConnection(64, name="lat"),
        Smoothing(32),
        TopDownMerge(add=False, name="merge3"),
        FeaturePyramid(64, min_level=3, max_level=5, lateral=False, output_levels=(3,), name="fpn"),
        MaxPoolP6(),
        ConvExtraLevels(32, num_levels=3),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_layer_config_round_trips_through_registry(layer):
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"fpn_tf>{type(layer).__name__}"
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is type(layer)
    assert restored.get_config() == layer.get_config()


def test_lateral_and_smoothing_convs():
    x = np.random.default_rng(0).normal(size=(1, 9, 7, 48)).astype("float32")
    lateral, smoothing = LateralConnection(16), Smoothing(16)
    y = lateral(x)
    assert y.shape == (1, 9, 7, 16)
    z = smoothing(y)
    assert z.shape == (1, 9, 7, 16)
    np.testing.assert_allclose(z.numpy(), _conv_same(y.numpy(), smoothing), atol=1e-5)
    for layer, fan_in in ((lateral, 48), (smoothing, 9 * 16)):
        kernel, bias = (w.numpy() for w in layer.conv.weights)
        np.testing.assert_array_equal(bias, 0.0)  # bias present, zero-initialised
        bound = np.sqrt(3.0 / fan_in)  # kaiming_uniform_(a=1)
        assert np.abs(kernel).max() <= bound
        assert np.abs(kernel).max() > 0.9 * bound
        assert abs(kernel.std() - bound / np.sqrt(3.0)) < 0.1 * bound
    with pytest.raises(ValueError, match="num_channels"):
        LateralConnection(0)


def test_top_down_merge_exact_values():
    coarse = np.array([[1.0, 2.0], [3.0, 4.0]], "float32").reshape(1, 2, 2, 1)
    lateral = np.arange(9, dtype="float32").reshape(1, 3, 3, 1) * 10
    upsampled = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 4]], "float32").reshape(1, 3, 3, 1)
    np.testing.assert_array_equal(TopDownMerge()([coarse, lateral]).numpy(), upsampled + lateral)
    # Without the add, the lateral map only gives the size (channels may differ).
    wide = np.zeros((1, 3, 3, 5), "float32")
    np.testing.assert_array_equal(TopDownMerge(add=False)([coarse, wide]).numpy(), upsampled)


def test_top_down_merge_dynamic_shapes_and_xla():
    rng = np.random.default_rng(1)
    coarse = rng.normal(size=(2, 4, 3, 8)).astype("float32")
    lateral = rng.normal(size=(2, 7, 6, 8)).astype("float32")
    expected = _up(coarse, 7, 6) + lateral
    merge = TopDownMerge()
    spec = tf.TensorSpec([None, None, None, 8], tf.float32)
    dynamic = tf.function(lambda a, b: merge([a, b]), input_signature=[spec, spec])
    np.testing.assert_array_equal(dynamic(coarse, lateral).numpy(), expected)
    compiled = tf.function(lambda a, b: merge([a, b]), jit_compile=True)
    np.testing.assert_array_equal(compiled(coarse, lateral).numpy(), expected)
    # Static shapes stay static in a functional graph.
    out = merge([keras.Input((4, 3, 8)), keras.Input((7, 6, 8))])
    assert tuple(out.shape) == (None, 7, 6, 8)


def test_top_down_merge_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="channels"):
        TopDownMerge()([keras.Input((4, 4, 8)), keras.Input((8, 8, 16))])
    with pytest.raises(ValueError, match="2x-downsampled"):
        TopDownMerge()([keras.Input((5, 4, 8)), keras.Input((8, 8, 8))])


def test_max_pool_p6():
    x = np.arange(2 * 5 * 7 * 3, dtype="float32").reshape(2, 5, 7, 3)
    (p6,) = MaxPoolP6()(x)
    assert p6.shape == (2, 3, 4, 3)  # ceil(5 / 2), ceil(7 / 2)
    np.testing.assert_array_equal(p6.numpy(), x[:, ::2, ::2])
    (symbolic,) = MaxPoolP6()(keras.Input((25, 42, 256)))
    assert tuple(symbolic.shape) == (None, 13, 21, 256)


def test_conv_extra_levels_p6_p7():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 7, 10, 12)).astype("float32")
    block = ConvExtraLevels(num_channels=8, num_levels=2)
    p6, p7 = block(x)
    assert p6.shape == (1, 4, 5, 8) and p7.shape == (1, 2, 3, 8)

    def conv_s2(t, conv):
        kernel, bias = (w.numpy() for w in conv.weights)
        return tf.nn.conv2d(t, kernel, 2, [[0, 0], [1, 1], [1, 1], [0, 0]]).numpy() + bias

    expected6 = conv_s2(x, block.convs[0])
    np.testing.assert_allclose(p6.numpy(), expected6, atol=1e-5)
    np.testing.assert_allclose(p7.numpy(), conv_s2(np.maximum(expected6, 0), block.convs[1]), atol=1e-5)
    assert block.output_channels(12) == 8 and MaxPoolP6().output_channels(12) == 12


# ---------------------------------------------------------------- FeaturePyramid


def _lat(features, pyramid, k):
    return _conv_same(features[f"C{k}"], pyramid.lateral_layers[k])


def test_feature_pyramid_top_down_with_lateral():
    features = _features(np.random.default_rng(3))
    pyramid = FeaturePyramid(num_channels=8)
    out = pyramid(features)
    assert list(out) == ["P2", "P3", "P4", "P5"]
    merged = _lat(features, pyramid, 5)
    for k in (5, 4, 3, 2):
        if k < 5:
            lateral = _lat(features, pyramid, k)
            merged = _up(merged, *lateral.shape[1:3]) + lateral
        np.testing.assert_allclose(out[f"P{k}"].numpy(), _conv_same(merged, pyramid.smoothing[k]), atol=1e-4)


def test_feature_pyramid_bottom_up_ablation():
    features = _features(np.random.default_rng(4))
    pyramid = FeaturePyramid(num_channels=8, top_down=False)
    out = pyramid(features)
    assert not pyramid.merges
    for k in (2, 3, 4, 5):
        expected = _conv_same(_lat(features, pyramid, k), pyramid.smoothing[k])
        np.testing.assert_allclose(out[f"P{k}"].numpy(), expected, atol=1e-4)


def test_feature_pyramid_no_lateral_ablation():
    features = _features(np.random.default_rng(5))
    pyramid = FeaturePyramid(num_channels=8, lateral=False)
    out = pyramid(features)
    assert sorted(pyramid.lateral_layers) == [5]  # only the 1x1 conv on C5
    merged = _lat(features, pyramid, 5)
    for k in (5, 4, 3, 2):
        if k < 5:
            merged = _up(merged, *features[f"C{k}"].shape[1:3])
        np.testing.assert_allclose(out[f"P{k}"].numpy(), _conv_same(merged, pyramid.smoothing[k]), atol=1e-4)


def test_feature_pyramid_level_subsets():
    features = _features(np.random.default_rng(6))
    finest = FeaturePyramid(num_channels=8, output_levels=(2,))
    full = FeaturePyramid(num_channels=8)
    full_p2 = full(features)["P2"]
    finest(features)
    assert sorted(finest.smoothing) == [2]  # no unused smoothing convs
    for k, layer in finest.lateral_layers.items():
        layer.set_weights(full.lateral_layers[k].get_weights())
    finest.smoothing[2].set_weights(full.smoothing[2].get_weights())
    out = finest(features)
    assert list(out) == ["P2"]
    np.testing.assert_array_equal(out["P2"].numpy(), full_p2.numpy())  # P2 of the full pyramid
    upper = FeaturePyramid(num_channels=8, min_level=3, max_level=4)
    out = upper(features)  # extra maps in the dict are ignored
    assert {k: v.shape for k, v in out.items()} == {"P3": (2, 7, 6, 8), "P4": (2, 4, 3, 8)}
    with pytest.raises(ValueError, match="C5"):
        FeaturePyramid(num_channels=8)({k: v for k, v in features.items() if k != "C5"})
    with pytest.raises(ValueError, match="lateral"):
        FeaturePyramid(lateral=False, top_down=False)
    with pytest.raises(ValueError, match="output_levels"):
        FeaturePyramid(output_levels=(6,))


def test_neck_parameter_count():
    pyramid = FeaturePyramid(num_channels=256)
    channels = {"C2": 256, "C3": 512, "C4": 1024, "C5": 2048}
    pyramid({k: keras.Input((None, None, c)) for k, c in channels.items()})
    assert pyramid.count_params() == 3_344_384


# ---------------------------------------------------------------- build_fpn_backbone


def test_resnet50_fpn_shapes_800x1344():
    model = build_fpn_backbone(BackboneConfig(name="resnet50"), FPNConfig())
    out = model.compute_output_spec(keras.KerasTensor((1, 800, 1344, 3)))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "P2": (1, 200, 336, 256),
        "P3": (1, 100, 168, 256),
        "P4": (1, 50, 84, 256),
        "P5": (1, 25, 42, 256),
        "P6": (1, 13, 21, 256),
    }
    assert model.get_layer("fpn").count_params() == 3_344_384
    assert fpn_output_specs() == {
        "P2": (256, 4),
        "P3": (256, 8),
        "P4": (256, 16),
        "P5": (256, 32),
        "P6": (256, 64),
    }


def test_resnet50_fpn_non_divisible_input():
    model = build_fpn_backbone(BackboneConfig(name="resnet50"), FPNConfig(), input_shape=(803, 1211, 3))
    shapes = [tuple(v.shape[1:3]) for v in model.output.values()]
    assert shapes == [(201, 303), (101, 152), (51, 76), (26, 38), (13, 19)]


VARIANTS = [
    # (FPNConfig, expected {level: (channels, stride)}) for the NARROW backbone.
    (FPNConfig(), {"P2": (256, 4), "P3": (256, 8), "P4": (256, 16), "P5": (256, 32), "P6": (256, 64)}),
    (
        FPNConfig(num_channels=32, extra_block="none"),
        {"P2": (32, 4), "P3": (32, 8), "P4": (32, 16), "P5": (32, 32)},
    ),
    (
        FPNConfig(num_channels=32, extra_block="conv_p5", num_extra_levels=2),
        {"P2": (32, 4), "P3": (32, 8), "P4": (32, 16), "P5": (32, 32), "P6": (32, 64), "P7": (32, 128)},
    ),
    (
        FPNConfig(num_channels=32, min_level=3, extra_block="conv_c5", num_extra_levels=2),
        {"P3": (32, 8), "P4": (32, 16), "P5": (32, 32), "P6": (32, 64), "P7": (32, 128)},
    ),
    (FPNConfig(num_channels=32, max_level=4), {"P2": (32, 4), "P3": (32, 8), "P4": (32, 16), "P5": (32, 32)}),
    (
        FPNConfig(variant="bottom_up", num_channels=32),
        {"P2": (32, 4), "P3": (32, 8), "P4": (32, 16), "P5": (32, 32), "P6": (32, 64)},
    ),
    (
        FPNConfig(variant="no_lateral", num_channels=32),
        {"P2": (32, 4), "P3": (32, 8), "P4": (32, 16), "P5": (32, 32), "P6": (32, 64)},
    ),
    (FPNConfig(variant="p2_only", num_channels=32), {"P2": (32, 4)}),
    (FPNConfig(variant="c4"), {"C4": (64, 16)}),
    (FPNConfig(variant="c5"), {"C5": (128, 32)}),
]


@pytest.mark.parametrize("fpn,expected", VARIANTS, ids=lambda v: getattr(v, "variant", ""))
def test_variants_levels_and_shapes(fpn, expected):
    assert fpn_output_specs(NARROW, fpn) == expected
    model = build_fpn_backbone(NARROW, fpn)
    images = np.random.default_rng(7).normal(size=(1, 100, 75, 3)).astype("float32")
    with tf.GradientTape() as tape:
        out = model(images, training=True)
        loss = sum(tf.reduce_sum(v) for v in out.values())
    assert list(out) == list(expected)
    for name, (channels, stride) in expected.items():
        assert tuple(out[name].shape) == (1, -(-100 // stride), -(-75 // stride), channels), name
    # Every trainable weight is used: ablations build no dead layers.
    grads = tape.gradient(loss, model.trainable_weights)
    assert all(g is not None for g in grads)


def test_single_scale_baselines_truncate_the_backbone():
    c4 = build_fpn_backbone(NARROW, FPNConfig(variant="c4"))
    body = c4.get_layer("resnet18")
    assert not any(layer.name.startswith("layer4") for layer in body.layers)
    assert any(layer.name.startswith("layer3") for layer in body.layers)
    full = build_fpn_backbone(NARROW, FPNConfig(variant="c5"))
    assert any(layer.name.startswith("layer4") for layer in full.get_layer("resnet18").layers)


@pytest.mark.parametrize(
    "fpn",
    [FPNConfig(num_channels=32), FPNConfig(variant="no_lateral", num_channels=16, extra_block="conv_c5")],
    ids=["fpn", "no_lateral_conv_c5"],
)
# Keras' own saving code calls np.array on variables, which numpy 2 warns about.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_keras_save_load_round_trip(tmp_path, fpn):
    backbone = BackboneConfig(name="resnet18", width_multiplier=0.25, norm="bn", freeze_at=3)
    model = build_fpn_backbone(backbone, fpn)
    images = np.random.default_rng(8).normal(size=(1, 96, 80, 3)).astype("float32")
    expected = model(images)
    path = str(tmp_path / "fpn.keras")
    model.save(path)
    restored = keras.models.load_model(path, safe_mode=True)
    got = restored(images)
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name].numpy(), expected[name].numpy())
    assert [w.path for w in restored.trainable_weights] == [w.path for w in model.trainable_weights]


def test_compiles_with_xla():
    model = build_fpn_backbone(NARROW, FPNConfig(num_channels=16))
    images = np.random.default_rng(9).normal(size=(1, 67, 93, 3)).astype("float32")
    eager = model(images)
    compiled = tf.function(lambda x: model(x), jit_compile=True)(images)
    for name in eager:
        np.testing.assert_allclose(compiled[name].numpy(), eager[name].numpy(), atol=1e-4)


def test_bad_fpn_config_errors():
    with pytest.raises(ValueError, match="fpn, bottom_up, no_lateral, p2_only, c4, c5"):
        build_fpn_backbone(NARROW, FPNConfig(variant="panet"))
    with pytest.raises(ValueError, match="extra_block"):
        fpn_output_specs(NARROW, FPNConfig(extra_block="avgpool"))
    with pytest.raises(ValueError, match="num_extra_levels"):
        fpn_output_specs(NARROW, FPNConfig(num_extra_levels=2))
    with pytest.raises(ValueError, match="min_level"):
        build_fpn_backbone(NARROW, FPNConfig(min_level=1))
    with pytest.raises(ValueError, match="max_level"):
        fpn_output_specs(NARROW, FPNConfig(max_level=6))
