"""Writes the synthetic shapes dataset (train + val splits) as PNG images + COCO JSON.

    python scripts/make_synthetic.py --out_dir=/tmp/shapes --num_train=200 --num_val=50

Layout: ``OUT/train/images/*.png``, ``OUT/train/annotations.json`` and the same
under ``OUT/val``; point ``data.source: coco_json`` (or ``data.source: synthetic``
with ``data.train_dir`` / ``data.eval_dir``) at them. The same flags always give
the same files; a split already written with the same flags is left alone.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", None, "folder for the train/ and val/ splits", required=True)
flags.DEFINE_integer("num_train", 200, "training images")
flags.DEFINE_integer("num_val", 50, "validation images")
flags.DEFINE_integer("image_size", 256, "image side in pixels")
flags.DEFINE_integer("num_classes", 3, "shapes (1..6): square, disk, triangle, cross, ring, diamond")
flags.DEFINE_integer("seed", 0, "dataset seed (the val split uses its own stream)")


def main(argv):
    del argv
    from fpn_tf.data.synthetic import write_synthetic_coco

    for split, num in (("train", FLAGS.num_train), ("val", FLAGS.num_val)):
        start = time.perf_counter()
        try:
            image_dir, ann = write_synthetic_coco(
                os.path.join(FLAGS.out_dir, split),
                num,
                image_size=FLAGS.image_size,
                num_classes=FLAGS.num_classes,
                seed=FLAGS.seed,
                split=split,
            )
        except ValueError as e:
            raise app.UsageError(str(e)) from None
        with open(ann, encoding="utf-8") as f:
            coco = json.load(f)
        print(
            f"{split}: {len(coco['images'])} images, {len(coco['annotations'])} objects, "
            f"{len(coco['categories'])} classes -> {image_dir}, {ann} ({time.perf_counter() - start:.1f} s)"
        )


if __name__ == "__main__":
    app.run(main)
