"""SavedModels for TensorFlow Serving: layout, versions, assets, loading.

TF Serving watches ``<export_dir_base>/<name>/`` and serves the highest numeric
sub-directory. ``export_saved_model`` writes::

    <export_dir_base>/<name>/<version>/
        saved_model.pb                 # signatures: serving_default, image_tensor, tf_example
        variables/variables.{index,data-*}
        assets/label_map.json          # LabelMap.to_json(): category ids and names
        assets/model_config.json       # fpn_tf.config.to_dict(ModelConfig), as served
        assets/serving_precision.json  # compute dtype, why, exporting CPU + ISA (export.precision)

It is written to a hidden temporary directory beside the version and renamed
into place, so a running server never sees a half-written version; folders and
files get the usual modes (0777 / 0666 minus the umask: 0755 / 0644 with the
common umask 022), so a server running as another user can read them.

``tf.saved_model.save`` runs on a ``tf.Module`` (``DetectionModule``) that holds
the model: each variable is stored once (Keras' ``model.export`` stores them
twice). The signatures are described in ``fpn_tf.export.serving``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import tensorflow as tf

from fpn_tf.checkpoints import restore_model  # noqa: F401  (re-exported for the scripts)
from fpn_tf.config import ModelConfig, from_dict, to_dict
from fpn_tf.data.label_map import LabelMap
from fpn_tf.export.precision import PRECISION_ASSET, cpu_info
from fpn_tf.export.serving import DEFAULT_MAX_IMAGE_PIXELS, FULL_IMAGE_MAX_PIXELS, DetectionModule

LABEL_MAP_ASSET = "label_map.json"
MODEL_CONFIG_ASSET = "model_config.json"


def _current_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def _usual_permissions(root: str) -> None:
    """Folders 0777 and files 0666 minus the umask, as ``mkdir`` / ``open`` give them.

    ``tempfile.mkdtemp`` makes the version folder 0700, which a TF Serving process
    running as another user cannot read.
    """
    mask = _current_umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def existing_versions(model_dir: str) -> list[int]:
    """Sorted numeric version directories in ``model_dir`` (empty when it does not exist)."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(
        int(d) for d in os.listdir(model_dir) if d.isdigit() and os.path.isdir(os.path.join(model_dir, d))
    )


def served_model_config(model) -> ModelConfig:
    """``model.config`` with the inference settings the model actually runs with.

    A caller may change e.g. a detection generator's ``score_threshold`` after
    building; the exported config records the values the SavedModel was traced with
    (``Detector.served_config``).
    """
    return model.served_config()


def _new_version_path(export_dir_base: str, name: str, version: int | None) -> str:
    """``<base>/<name>/<version>`` checked not to exist (None: one past the highest version)."""
    if not name or name in (".", "..") or os.sep in name or "/" in name or name.startswith("."):
        raise ValueError(f"export name {name!r} must be one non-hidden path component")
    model_dir = os.path.join(export_dir_base, name)
    os.makedirs(model_dir, exist_ok=True)
    if version is None:
        version = max(existing_versions(model_dir), default=0) + 1
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be a non-negative integer (TF Serving's layout), got {version!r}")
    path = os.path.join(model_dir, str(version))
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; choose another --version or remove it")
    return path


def _attach_assets(module, model, folder: str, precision_reason: str | None) -> None:
    """Writes the label map, model config and serving precision into ``folder`` as the module's assets."""
    label_path = os.path.join(folder, LABEL_MAP_ASSET)
    with open(label_path, "w", encoding="utf-8") as f:
        f.write(module.label_map.to_json())
    config_path = os.path.join(folder, MODEL_CONFIG_ASSET)
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(to_dict(served_model_config(model)), f, indent=1)
    precision_path = os.path.join(folder, PRECISION_ASSET)
    with open(precision_path, "w", encoding="utf-8") as f:
        precision = {
            "compute_dtype": model.config.compute_dtype,
            "reason": precision_reason or "the model's config",
            "export_cpu": cpu_info(),
        }
        json.dump(precision, f, indent=1)
    module.label_map_file = tf.saved_model.Asset(label_path)
    module.model_config_file = tf.saved_model.Asset(config_path)
    module.serving_precision_file = tf.saved_model.Asset(precision_path)


def export_saved_model(
    model,
    export_dir_base: str,
    name: str,
    version: int | None = None,
    label_map: LabelMap | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    full_image_masks: bool = False,
    full_image_max_pixels: int = FULL_IMAGE_MAX_PIXELS,
    precision_reason: str | None = None,
) -> str:
    """Exports a FasterRCNN as ``<export_dir_base>/<name>/<version>/`` for TF Serving.

    Args:
      model: a built ``FasterRCNN`` (its ``config`` a ModelConfig).
      export_dir_base: the directory TF Serving's ``--model_base_path`` parent.
      name: the model name (one path component; TF Serving's MODEL_NAME).
      version: a non-negative integer; None = one more than the highest existing
        version (1 for the first export).
      label_map: maps the model's labels to the dataset's category ids and names;
        None = identity (category id = label, names ``class_<id>``).
      max_image_pixels: the largest height x width a served image may have
        (``serving.DEFAULT_MAX_IMAGE_PIXELS``: 50 MP).
      full_image_masks: a mask model's signatures also return
        ``detection_masks_image`` (binary masks in original pixels; images over
        ``full_image_max_pixels`` original pixels are refused, see
        ``fpn_tf.export.serving``). Box-relative ``detection_masks`` are always served.
      precision_reason: why the model runs in its ``config.compute_dtype``
        (``export.precision.resolve_serving_dtype``'s reason), recorded in the
        ``serving_precision.json`` asset; None = "the model's config".

    Returns:
      The path of the written version directory.

    Raises:
      FileExistsError: the version already exists (exports never overwrite).
      ValueError: a bad name or version, or a label map that does not fit the model.
    """
    path = _new_version_path(export_dir_base, name, version)
    module = DetectionModule(
        model,
        label_map,
        max_image_pixels=max_image_pixels,
        full_image_masks=full_image_masks,
        full_image_max_pixels=full_image_max_pixels,
    )
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-", dir=os.path.dirname(path))
    try:
        with tempfile.TemporaryDirectory() as assets_src:
            _attach_assets(module, model, assets_src, precision_reason)
            tf.saved_model.save(module, tmp, signatures=module.signatures())
        _usual_permissions(tmp)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_label_map(path: str) -> LabelMap:
    """The label map asset of an exported version directory."""
    with open(os.path.join(path, "assets", LABEL_MAP_ASSET), encoding="utf-8") as f:
        return LabelMap.from_json(f.read())


def read_serving_precision(path: str) -> dict:
    """The ``serving_precision.json`` asset of a version directory ({} for older exports)."""
    asset = os.path.join(path, "assets", PRECISION_ASSET)
    if not os.path.isfile(asset):
        return {}
    with open(asset, encoding="utf-8") as f:
        return json.load(f)


def read_model_config(path: str) -> ModelConfig:
    """The ModelConfig asset of an exported version directory (as served)."""
    with open(os.path.join(path, "assets", MODEL_CONFIG_ASSET), encoding="utf-8") as f:
        return from_dict(ModelConfig, json.load(f))


def resolve_version_dir(path: str) -> str:
    """``path`` itself if it holds saved_model.pb, else its highest numeric version."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = existing_versions(path)
    if not versions:
        raise FileNotFoundError(f"{path} holds neither saved_model.pb nor numeric version directories")
    return os.path.join(path, str(versions[-1]))


def load_exported(path: str):
    """Loads an export: ``(loaded, label_map)``.

    Args:
      path: a version directory, or the model directory (its highest version).

    Returns:
      ``loaded``: the ``tf.saved_model.load`` object; call
      ``loaded.signatures["serving_default"](encoded_images=...)`` (or the
      ``serve_encoded`` / ``serve_image_tensor`` / ``serve_tf_example`` functions);
      ``label_map``: the ``LabelMap`` asset (category ids and names).
    """
    path = resolve_version_dir(path)
    loaded = tf.saved_model.load(path)
    return loaded, read_label_map(path)
