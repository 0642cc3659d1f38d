"""Dataset category ids <-> contiguous training labels.

Label 0 is background; a dataset's K-1 categories, sorted by category id, get the
labels ``1 .. K-1`` (so ``num_classes = K``). COCO's 80 categories have ids
1..90 with gaps; they become labels 1..80. Exported detections map back with
``to_category_id``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import tensorflow as tf


class LabelMap:
    """Mapping between dataset category ids and contiguous labels ``1..K-1``.

    Args:
      category_ids: the K-1 dataset category ids (distinct ints, any order; they are
        sorted by id, which fixes the labels).
      names: the K-1 category names, in the same order as ``category_ids``.
    """

    def __init__(self, category_ids: Sequence[int], names: Sequence[str]):
        ids = [int(i) for i in category_ids]
        names = [str(n) for n in names]
        if len(ids) != len(names):
            raise ValueError(f"LabelMap: {len(ids)} category ids but {len(names)} names")
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"LabelMap: duplicate category ids {dup}")
        order = sorted(range(len(ids)), key=lambda k: ids[k])
        self.category_ids: list[int] = [ids[k] for k in order]
        self.names: list[str] = [names[k] for k in order]
        self._label_of = {cid: label for label, cid in enumerate(self.category_ids, start=1)}

    @property
    def num_classes(self) -> int:
        """K (counts the background label 0)."""
        return len(self.category_ids) + 1

    def __len__(self) -> int:
        return len(self.category_ids)

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, LabelMap)
            and self.category_ids == other.category_ids
            and self.names == other.names
        )

    def __repr__(self) -> str:
        more = "..." if len(self) > 6 else ""
        return f"LabelMap(num_classes={self.num_classes}, names={self.names[:6]}{more})"

    def __contains__(self, category_id) -> bool:
        return int(category_id) in self._label_of

    def label_of(self, category_id: int) -> int:
        """Contiguous label of one category id (KeyError naming it when absent)."""
        if int(category_id) not in self._label_of:
            raise KeyError(f"category id {category_id} is not in the label map {self.category_ids}")
        return self._label_of[int(category_id)]

    def name(self, label: int) -> str:
        """Name of contiguous ``label`` (0 -> "background")."""
        if label == 0:
            return "background"
        return self.names[self._check_label(label) - 1]

    def _check_label(self, label: int) -> int:
        if not 1 <= int(label) <= len(self.category_ids):
            raise ValueError(f"label {label} is not a foreground label 1..{len(self.category_ids)}")
        return int(label)

    def to_label(self, category_ids) -> np.ndarray:
        """Dataset category ids (int or array) -> contiguous labels int32 (same shape).

        Raises ValueError naming any id that is not in the map.
        """
        arr = np.asarray(category_ids)
        flat = arr.reshape(-1).tolist()
        unknown = sorted({int(c) for c in flat if int(c) not in self._label_of})
        if unknown:
            raise ValueError(f"category id(s) {unknown} are not in the label map {self.category_ids}")
        return np.asarray([self._label_of[int(c)] for c in flat], np.int32).reshape(arr.shape)

    def to_category_id(self, labels) -> np.ndarray:
        """Contiguous labels ``1..K-1`` (int or array) -> dataset category ids int64."""
        arr = np.asarray(labels)
        flat = arr.reshape(-1).tolist()
        for label in flat:
            self._check_label(label)
        ids = np.asarray(self.category_ids, np.int64)
        return ids[np.asarray(flat, np.int64).reshape(arr.shape) - 1]

    def category_id_table(self) -> tf.Tensor:
        """int64 ``[K]``: entry ``label`` is its category id; entry 0 (background) is 0."""
        return tf.constant([0, *self.category_ids], tf.int64)

    def to_category_id_tf(self, labels: tf.Tensor) -> tf.Tensor:
        """Graph version of ``to_category_id``: int labels (any shape) -> int64 ids.

        Labels outside ``1..K-1`` (background 0, padding -1) map to 0. XLA-compatible.
        """
        labels = tf.cast(labels, tf.int32)
        valid = tf.logical_and(labels >= 1, labels <= len(self.category_ids))
        ids = tf.gather(self.category_id_table(), tf.where(valid, labels, 0))
        return tf.where(valid, ids, tf.zeros_like(ids))

    def to_label_tf(self, category_ids: tf.Tensor) -> tf.Tensor:
        """Graph version of ``to_label``: int category ids -> int32 labels; unknown ids give -1."""
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(self.category_ids, tf.int64),
                tf.range(1, len(self.category_ids) + 1, dtype=tf.int64),
            ),
            default_value=-1,
        )
        return tf.cast(table.lookup(tf.cast(category_ids, tf.int64)), tf.int32)

    def to_json(self) -> str:
        """Plain JSON: ``{"category_ids": [...], "names": [...]}`` in label order."""
        return json.dumps({"category_ids": self.category_ids, "names": self.names})

    @classmethod
    def from_json(cls, text: str) -> LabelMap:
        data = json.loads(text)
        if not isinstance(data, dict) or set(data) != {"category_ids", "names"}:
            raise ValueError('label map JSON must be an object with exactly "category_ids" and "names"')
        return cls(data["category_ids"], data["names"])

    @classmethod
    def from_coco(cls, coco) -> LabelMap:
        """From a pycocotools ``COCO`` object's categories."""
        cats = coco.loadCats(coco.getCatIds())
        return cls([c["id"] for c in cats], [c["name"] for c in cats])
