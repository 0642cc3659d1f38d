"""Builds ResNet + FPN and prints every pyramid level's name, shape and stride.

    python scripts/show_pyramid.py --backbone=resnet50 --height=800 --width=1344
    python scripts/show_pyramid.py --image=photo.jpg --backbone=resnet18 --width_multiplier=0.25

Weights are random (pretrained ones cannot be downloaded here): this shows the
shape contract (§3: P2..P6 at strides 4..64, d = 256), not features. With
``--image`` the picture is resized to --height × --width and normalised with the
ImageNet mean / std of ``InputConfig``; without it a zero image is used.
"""

from __future__ import annotations

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("backbone", "resnet50", "resnet18 | resnet34 | resnet50 | resnet101 | resnet152")
flags.DEFINE_float("width_multiplier", 1.0, "scales every backbone channel count")
flags.DEFINE_string("variant", "fpn", "FPNConfig.variant: fpn | bottom_up | no_lateral | p2_only | c4 | c5")
flags.DEFINE_integer("height", 800, "input height in pixels")
flags.DEFINE_integer("width", 1344, "input width in pixels")
flags.DEFINE_string("image", None, "optional image file (JPEG/PNG/...) to run through the pyramid")


def main(argv):
    del argv
    import tensorflow as tf

    from fpn_tf.config import BackboneConfig, FPNConfig, InputConfig
    from fpn_tf.models.fpn_backbone import build_fpn_backbone, fpn_output_specs

    if FLAGS.height < 1 or FLAGS.width < 1:
        raise app.UsageError(f"--height and --width must be positive, got {FLAGS.height}x{FLAGS.width}")
    backbone = BackboneConfig(name=FLAGS.backbone, width_multiplier=FLAGS.width_multiplier)
    fpn = FPNConfig(variant=FLAGS.variant)
    try:
        specs = fpn_output_specs(backbone, fpn)  # validates the names before building
    except ValueError as e:
        raise app.UsageError(str(e)) from None

    if FLAGS.image:
        image = tf.io.decode_image(tf.io.read_file(FLAGS.image), channels=3, expand_animations=False)
        image = tf.image.resize(tf.cast(image, tf.float32), (FLAGS.height, FLAGS.width))
        source = f"{FLAGS.image} resized to {FLAGS.height}x{FLAGS.width}"
    else:
        image = tf.zeros((FLAGS.height, FLAGS.width, 3), tf.float32)
        source = f"zeros {FLAGS.height}x{FLAGS.width}"
    inputs = InputConfig()
    images = ((image - inputs.pixel_mean) / inputs.pixel_std)[None]

    model = build_fpn_backbone(backbone, fpn)
    levels = model(images, training=False)
    print(f"{FLAGS.backbone} (width x{FLAGS.width_multiplier:g}) + {FLAGS.variant}, input {source}")
    print(f"parameters: {model.count_params():,}")
    print(f"{'level':<6}{'shape':<24}{'stride':>6}")
    for name, tensor in levels.items():
        _, stride = specs[name]
        print(f"{name:<6}{str(list(tensor.shape)):<24}{stride:>6}")


if __name__ == "__main__":
    app.run(main)
