"""ResNet bottom-up pathway and FrozenBatchNorm."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from fpn_tf.config import BackboneConfig
from fpn_tf.layers.frozen_batch_norm import FrozenBatchNorm
from fpn_tf.models.resnet import build_resnet, resnet_output_specs

NARROW = BackboneConfig(name="resnet18", width_multiplier=0.25)

# torchvision's parameter counts (torchvision.models.resnetXX().parameters(), fc included).
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "resnet101": 44_549_160}


def _conv_layers(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


# ---------------------------------------------------------------- FrozenBatchNorm


def test_frozen_batch_norm_matches_formula():
    rng = np.random.default_rng(0)
    layer = FrozenBatchNorm(epsilon=1e-3)
    x = rng.normal(size=(2, 3, 5, 4)).astype("float32")
    layer.build(x.shape)
    gamma, beta, mean = (rng.normal(size=4).astype("float32") for _ in range(3))
    var = rng.uniform(0.1, 2.0, size=4).astype("float32")
    layer.set_weights([gamma, beta, mean, var])
    expected = (x - mean) / np.sqrt(var + 1e-3) * gamma + beta
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    # Same result in training mode: nothing is updated.
    np.testing.assert_allclose(layer(x, training=True).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), mean)


def test_frozen_batch_norm_fused_op_only_where_no_gradient_is_needed():
    # Inference and frozen layers: FusedBatchNormV3 (grappler folds it into the conv);
    # a trainable layer in training: multiply + add (no saved activation for the gradient).
    x = tf.ones((1, 4, 4, 8))
    layer = FrozenBatchNorm()
    layer.build(x.shape)

    def op_types(training):
        graph = tf.function(lambda t: layer(t, training=training)).get_concrete_function(x).graph
        return {op.type for op in graph.get_operations()}

    assert "FusedBatchNormV3" in op_types(False)
    assert "FusedBatchNormV3" not in op_types(True)
    layer.trainable = False
    assert "FusedBatchNormV3" in op_types(True)
    # Rank other than 4: always multiply + add.
    flat = FrozenBatchNorm()
    flat.build((None, 8))
    assert "FusedBatchNormV3" not in {
        op.type
        for op in tf.function(lambda t: flat(t)).get_concrete_function(tf.ones((2, 8))).graph.get_operations()
    }


def test_frozen_batch_norm_weights_are_named_and_not_trainable():
    layer = FrozenBatchNorm()
    layer.build((None, 8))
    assert layer.epsilon == 1e-5
    assert [w.name for w in layer.weights] == ["gamma", "beta", "moving_mean", "moving_variance"]
    assert layer.trainable_weights == []
    assert len(layer.non_trainable_weights) == 4
    # Identity at initialisation (up to epsilon).
    x = np.arange(16, dtype="float32").reshape(2, 8)
    np.testing.assert_allclose(layer(x).numpy(), x / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_frozen_batch_norm_config_round_trip_and_errors():
    layer = FrozenBatchNorm(epsilon=0.0, name="bn1")
    config = layer.get_config()
    assert config["epsilon"] == 0.0
    assert FrozenBatchNorm.from_config(config).get_config() == config
    with pytest.raises(ValueError, match="epsilon"):
        FrozenBatchNorm(epsilon=-1.0)
    with pytest.raises(ValueError, match="channel"):
        FrozenBatchNorm().build((None, None))


def test_frozen_batch_norm_mixed_precision():
    layer = FrozenBatchNorm(dtype="mixed_bfloat16")
    x = np.linspace(-2, 2, 24, dtype="float32").reshape(1, 2, 3, 4)
    y = layer(x)
    assert y.dtype == tf.bfloat16
    assert layer.gamma.dtype == "float32"
    np.testing.assert_allclose(tf.cast(y, tf.float32).numpy(), x, atol=2e-2)


# ---------------------------------------------------------------- architecture


def test_resnet50_conv_kernel_count_and_torchvision_parameter_count():
    config = BackboneConfig(name="resnet50")
    model = build_resnet(config)
    conv_values = sum(int(np.prod(layer.kernel.shape)) for layer in _conv_layers(model))
    assert conv_values == 23_454_912
    # No conv has a bias; conv + BN affine + torchvision's fc = torchvision's total.
    assert all(not layer.use_bias for layer in _conv_layers(model))
    bn_affine = sum(2 * layer.gamma.shape[0] for layer in model.layers if isinstance(layer, FrozenBatchNorm))
    assert conv_values + bn_affine + 2048 * 1000 + 1000 == TORCHVISION_PARAMS["resnet50"]


@pytest.mark.parametrize("name", ["resnet18", "resnet101"])
def test_parameter_count_matches_torchvision(name):
    config = BackboneConfig(name=name)
    model = build_resnet(config)
    c5 = resnet_output_specs(config)["C5"][0]
    # All kernels and gammas/betas; moving statistics are not parameters in PyTorch.
    affine = sum(int(np.prod(w.shape)) for w in model.weights if w.name in ("kernel", "gamma", "beta"))
    assert affine + c5 * 1000 + 1000 == TORCHVISION_PARAMS[name]


def test_non_divisible_input_sizes():
    model = build_resnet(BackboneConfig(name="resnet50"), input_shape=(803, 1211, 3))
    shapes = {k: tuple(v.shape) for k, v in model.output.items()}
    assert shapes == {
        "C2": (None, 201, 303, 256),
        "C3": (None, 101, 152, 512),
        "C4": (None, 51, 76, 1024),
        "C5": (None, 26, 38, 2048),
    }


def test_output_specs():
    assert resnet_output_specs(BackboneConfig(name="resnet50")) == {
        "C2": (256, 4),
        "C3": (512, 8),
        "C4": (1024, 16),
        "C5": (2048, 32),
    }
    assert resnet_output_specs(BackboneConfig(name="resnet34")) == {
        "C2": (64, 4),
        "C3": (128, 8),
        "C4": (256, 16),
        "C5": (512, 32),
    }
    assert resnet_output_specs(NARROW) == {"C2": (16, 4), "C3": (32, 8), "C4": (64, 16), "C5": (128, 32)}
    half50 = resnet_output_specs(BackboneConfig(name="resnet50", width_multiplier=0.5))
    assert [c for c, _ in half50.values()] == [128, 256, 512, 1024]


def test_forward_matches_specs_on_odd_input():
    model = build_resnet(NARROW)
    assert model.name == "resnet18"
    out = model(np.zeros((2, 67, 45, 3), "float32"))
    specs = resnet_output_specs(NARROW)
    assert list(out) == ["C2", "C3", "C4", "C5"]
    sizes = [(17, 12), (9, 6), (5, 3), (3, 2)]
    for (key, (channels, _stride)), (h, w) in zip(specs.items(), sizes):
        assert tuple(out[key].shape) == (2, h, w, channels)


def test_bad_config_errors():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50, resnet101"):
        build_resnet(BackboneConfig(name="resnet51"))
    with pytest.raises(ValueError, match="valid names"):
        resnet_output_specs(BackboneConfig(name="vgg16"))
    with pytest.raises(ValueError, match="norm"):
        build_resnet(BackboneConfig(name="resnet18", norm="group_norm"))
    with pytest.raises(ValueError, match="freeze_at"):
        build_resnet(BackboneConfig(name="resnet18", freeze_at=6))
    with pytest.raises(ValueError, match="width_multiplier"):
        build_resnet(BackboneConfig(name="resnet18", width_multiplier=0.0))
    with pytest.raises(ValueError, match="input_shape"):
        build_resnet(NARROW, input_shape=(64, 64))


# ---------------------------------------------------------------- norm and freezing


def test_norm_choice_and_epsilon():
    frozen = build_resnet(BackboneConfig(name="resnet18", width_multiplier=0.25, bn_epsilon=0.0))
    assert isinstance(frozen.get_layer("bn1"), FrozenBatchNorm)
    assert frozen.get_layer("layer4_1_bn2").epsilon == 0.0
    bn = build_resnet(BackboneConfig(name="resnet18", width_multiplier=0.25, norm="bn", freeze_at=0))
    layer = bn.get_layer("layer2_0_downsample_1")
    assert type(layer) is keras.layers.BatchNormalization
    assert layer.epsilon == 1e-5 and layer.momentum == 0.9
    assert [w.name for w in layer.trainable_weights] == ["gamma", "beta"]


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_freeze_at(freeze_at):
    config = BackboneConfig(name="resnet18", width_multiplier=0.25, freeze_at=freeze_at)
    model = build_resnet(config)
    stage_of = {"conv1": 1, "bn1": 1, "layer1": 2, "layer2": 3, "layer3": 4, "layer4": 5}
    for layer in model.layers:
        if layer.weights:
            stage = stage_of[layer.name.split("_")[0]]
            assert layer.trainable == (stage > freeze_at), layer.name
    trainable_convs = [w for w in model.trainable_weights if w.name == "kernel"]
    # resnet18: stem 1 conv; layer1 4; layer2..4: 5 each (incl. downsample).
    convs_per_stage = [1, 4, 5, 5, 5]
    assert len(trainable_convs) == sum(convs_per_stage[freeze_at:])
    assert not any(w.name in ("gamma", "beta") for w in model.trainable_weights)  # frozen BN


# ---------------------------------------------------------------- torchvision names and layout


def _torchvision_state_dict_shapes(config: BackboneConfig) -> dict[str, tuple[int, ...]]:
    """The torchvision ResNet state-dict keys and PyTorch shapes (fc excluded), spelled out."""
    depths = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}[config.name]
    bottleneck = config.name == "resnet50"
    expansion = 4 if bottleneck else 1
    w = config.width_multiplier
    shapes = {}

    def conv(key, cout, cin, k):
        shapes[f"{key}.weight"] = (cout, cin, k, k)

    def bn(key, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{key}.{p}"] = (c,)

    stem = round(64 * w)
    conv("conv1", stem, 3, 7)
    bn("bn1", stem)
    inplanes = stem
    for i, depth in enumerate(depths):
        planes = round(64 * 2**i * w)
        for j in range(depth):
            prefix = f"layer{i + 1}.{j}"
            if bottleneck:
                conv(f"{prefix}.conv1", planes, inplanes, 1)
                bn(f"{prefix}.bn1", planes)
                conv(f"{prefix}.conv2", planes, planes, 3)
                bn(f"{prefix}.bn2", planes)
                conv(f"{prefix}.conv3", planes * 4, planes, 1)
                bn(f"{prefix}.bn3", planes * 4)
            else:
                conv(f"{prefix}.conv1", planes, inplanes, 3)
                bn(f"{prefix}.bn1", planes)
                conv(f"{prefix}.conv2", planes, planes, 3)
                bn(f"{prefix}.bn2", planes)
            if j == 0 and (i > 0 or inplanes != planes * expansion):
                conv(f"{prefix}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{prefix}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    return shapes


_PARAM_NAMES = {"running_mean": "moving_mean", "running_var": "moving_variance", "bias": "beta"}


def _keras_weight(model, key):
    """The documented mapping rule: module path '.' -> '_', parameter renamed."""
    module, param = key.rsplit(".", 1)
    layer = model.get_layer(module.replace(".", "_"))
    if param == "weight":
        param = "kernel" if isinstance(layer, keras.layers.Conv2D) else "gamma"
    else:
        param = _PARAM_NAMES[param]
    (weight,) = [v for v in layer.weights if v.name == param]
    return weight


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_every_torchvision_key_maps_to_one_weight(name):
    config = BackboneConfig(name=name, width_multiplier=0.25)
    model = build_resnet(config)
    shapes = _torchvision_state_dict_shapes(config)
    mapped = []
    for key, shape in shapes.items():
        weight = _keras_weight(model, key)
        expected = (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape
        assert tuple(weight.shape) == expected, key
        mapped.append(weight.path)
    assert sorted(mapped) == sorted(w.path for w in model.weights)  # a bijection


def _reference_forward(state: dict[str, np.ndarray], config: BackboneConfig, x: np.ndarray) -> dict:
    """torchvision's ResNet forward written with tf.nn ops on a PyTorch-layout state dict."""
    eps = config.bn_epsilon
    bottleneck = config.name == "resnet50"

    def conv(t, key, stride):
        kernel = np.transpose(state[f"{key}.weight"], (2, 3, 1, 0))
        p = (kernel.shape[0] - 1) // 2
        return tf.nn.conv2d(t, kernel, stride, [[0, 0], [p, p], [p, p], [0, 0]])

    def bn(t, key):
        g, b, m, v = (state[f"{key}.{p}"] for p in ("weight", "bias", "running_mean", "running_var"))
        return (t - m) / np.sqrt(v + eps) * g + b

    t = tf.nn.relu(bn(conv(x, "conv1", 2), "bn1"))
    t = tf.pad(t, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=-np.inf)
    t = tf.nn.max_pool2d(t, 3, 2, "VALID")
    outputs = {}
    for i in range(4):
        j = 0
        while f"layer{i + 1}.{j}.conv1.weight" in state:
            prefix = f"layer{i + 1}.{j}"
            stride = 2 if i > 0 and j == 0 else 1
            if bottleneck:
                y = tf.nn.relu(bn(conv(t, f"{prefix}.conv1", 1), f"{prefix}.bn1"))
                y = tf.nn.relu(bn(conv(y, f"{prefix}.conv2", stride), f"{prefix}.bn2"))
                y = bn(conv(y, f"{prefix}.conv3", 1), f"{prefix}.bn3")
            else:
                y = tf.nn.relu(bn(conv(t, f"{prefix}.conv1", stride), f"{prefix}.bn1"))
                y = bn(conv(y, f"{prefix}.conv2", 1), f"{prefix}.bn2")
            shortcut = t
            if f"{prefix}.downsample.0.weight" in state:
                shortcut = bn(conv(t, f"{prefix}.downsample.0", stride), f"{prefix}.downsample.1")
            t = tf.nn.relu(y + shortcut)
            j += 1
        outputs[f"C{i + 2}"] = t.numpy()
    return outputs


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_forward_matches_torchvision_layout_reference(name):
    """Weights loaded by the mapping rule reproduce torchvision's forward (odd sizes, stride 2)."""
    config = BackboneConfig(name=name, width_multiplier=0.25, bn_epsilon=1e-5)
    model = build_resnet(config)
    rng = np.random.default_rng(1)
    state = {}
    for key, shape in _torchvision_state_dict_shapes(config).items():
        if key.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, size=shape)
        elif key.endswith(".weight") and len(shape) == 4:
            value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        else:
            value = rng.normal(size=shape) * 0.1 + (1.0 if key.endswith("bn1.weight") else 0.0)
        state[key] = value.astype("float32")
        weight = _keras_weight(model, key)
        weight.assign(np.transpose(state[key], (2, 3, 1, 0)) if len(shape) == 4 else state[key])
    x = rng.normal(size=(1, 70, 53, 3)).astype("float32")
    expected = _reference_forward(state, config, x)
    got = model(x)
    for key in ("C2", "C3", "C4", "C5"):
        assert got[key].shape == expected[key].shape
        scale = np.abs(expected[key]).max()
        np.testing.assert_allclose(got[key].numpy() / scale, expected[key] / scale, atol=1e-4, err_msg=key)


# ------------------------------------------------------------------ frozen BN folded into bfloat16 convs
def _resnet_with_statistics(policy: str, freeze_at: int = 2):
    """resnet18 × 0.25 under ``policy`` with the same non-trivial frozen statistics."""
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        model = build_resnet(BackboneConfig(name="resnet18", width_multiplier=0.25, freeze_at=freeze_at))
    finally:
        keras.config.set_dtype_policy("float32")
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, FrozenBatchNorm):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [rng.uniform(0.5, 2, c), rng.normal(0, 1, c), rng.normal(0, 1, c), rng.uniform(0.5, 2, c)]
            )
    return model


@pytest.mark.parametrize("training", [False, True])
def test_bfloat16_convs_apply_their_frozen_norm_once(training):
    """bfloat16 (norms folded into the convs) matches float32 (norms fused by grappler) to bf16 rounding."""
    f32 = _resnet_with_statistics("float32")
    bf16 = _resnet_with_statistics("mixed_bfloat16")
    x = np.random.default_rng(1).normal(0, 1, (1, 64, 64, 3)).astype(np.float32)
    for key in ("C2", "C5"):
        a = f32(x, training=training)[key].numpy()
        b = tf.cast(bf16(x, training=training)[key], tf.float32).numpy()
        # a norm applied twice or not at all is off by ~100 % and more (these statistics are far from 1/0)
        assert np.abs(a - b).max() / np.abs(a).max() < 0.05, key
    # who folds: bfloat16 convs of frozen stages always, trainable ones only outside training; never float32
    assert bf16.get_layer("conv1").folds(training) and bf16.get_layer("layer1_0_conv1").folds(training)
    assert bf16.get_layer("layer4_0_conv1").folds(training) is (not training)
    assert not f32.get_layer("conv1").folds(training)


def test_bfloat16_inference_graph_has_no_separate_batch_norm():
    """Grappler fuses every bfloat16 conv with its (folded) norm's bias and ReLU: no FusedBatchNorm left."""
    from fpn_tf.export.precision import BF16_ISA, cpu_info

    if not set(BF16_ISA) & set(cpu_info()["isa"]):
        pytest.skip("oneDNN fuses bfloat16 convs only on CPUs with avx512_bf16 or amx_bf16")
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
    from tensorflow.python.grappler import tf_optimizer

    model = _resnet_with_statistics("mixed_bfloat16")
    function = tf.function(lambda x: model(x, training=False))
    concrete = function.get_concrete_function(tf.TensorSpec([1, 64, 64, 3], tf.float32))
    graph_def = concrete.graph.as_graph_def()
    for node in graph_def.node:  # the remapper fuses only nodes placed on a CPU
        node.device = "/job:localhost/replica:0/task:0/device:CPU:0"
    meta = tf.compat.v1.train.export_meta_graph(graph_def=graph_def, graph=concrete.graph)
    for output in concrete.outputs:
        meta.collection_def["train_op"].node_list.value.append(output.name)
    config = config_pb2.ConfigProto()
    config.graph_options.rewrite_options.CopyFrom(rewriter_config_pb2.RewriterConfig())
    ops = [node.op for node in tf_optimizer.OptimizeGraph(config, meta).node]
    assert not [op for op in ops if "BatchNorm" in op]
    assert (
        ops.count("_FusedConv2D") == 20
    )  # every conv of resnet18 (with its BiasAdd, and ReLU where one follows)
