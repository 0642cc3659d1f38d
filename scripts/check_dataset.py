"""Checks a COCO-JSON dataset before training: lists every problem, writes nothing.

    python scripts/check_dataset.py --images data/train2017 --annotations data/instances_train2017.json

Reads the annotation file, checks every image entry (id, size, file present and
inside the folder), every annotation (ids, image and category known, bbox four
finite numbers with positive width and height, overlapping its image) and
decodes every image with the training pipeline's decoder, comparing its size
with the JSON's. Each problem is printed on one line naming the image file or
the annotation id; the exit status is 1 when there is any problem, else 0.
Training itself skips an undecodable image (``data.bad_image_policy: skip``,
logged) or stops at it (``error``); this lists them all up front.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("images", None, "Folder holding the images (file_name is relative to it).", required=True)
flags.DEFINE_string("annotations", None, "COCO instances JSON.", required=True)
flags.DEFINE_bool("decode", True, "Decode every image (--nodecode: check the JSON and file presence only).")


def main(argv):
    del argv
    from fpn_tf.data.dataset_check import check_coco_dataset

    start = time.perf_counter()
    report = check_coco_dataset(FLAGS.annotations, FLAGS.images, decode=FLAGS.decode)
    for problem in report.problems:
        print(problem)
    took = time.perf_counter() - start
    counts = f"{report.num_images} image(s), {report.num_annotations} annotation(s)"
    if report.problems:
        print(f"{FLAGS.annotations}: {counts}: {len(report.problems)} problem(s) ({took:.1f} s)")
        sys.stdout.flush()
        return 1
    print(f"{FLAGS.annotations}: {counts}: no problems ({took:.1f} s)")
    return 0


if __name__ == "__main__":
    app.run(main)
