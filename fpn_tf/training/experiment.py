"""An experiment's training run: config -> strategy, model, data, hooks -> ``Trainer``.

``train(config, model_dir)`` is what ``scripts/train.py`` runs. The model is the
detector of ``config.model.type`` (``fpn_tf.models.build``); the data is
``build_dataset`` on the train split; the hooks are the trainer's defaults plus
evaluation every ``train.eval_every`` steps keeping the best checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras
import tensorflow as tf
from absl import logging

from fpn_tf import run_directory
from fpn_tf.config import ConfigError, ExperimentConfig, to_dict
from fpn_tf.data.pipeline import build_dataset
from fpn_tf.models.build import build_model
from fpn_tf.training import distribute
from fpn_tf.training.hooks import EvaluationHook
from fpn_tf.training.trainer import DatasetFn, Trainer, TrainResult
from fpn_tf.training.xla_choice import auto_xla

# Keys a rerun of a training directory may change without --allow_config_change:
# extending or re-pacing a run. Anything else (model, data, optimisation) is a different
# experiment; what changes the variables is refused even with the flag.
RERUN_FREE_KEYS = (
    "train.train_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.max_checkpoints_to_keep",
    "train.eval_every",
    "eval.",
)


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, name + ".")
        elif a != b:
            keys.append(f"{name} ({a!r} -> {b!r})")
    return keys


def check_rerun_config(config: ExperimentConfig, model_dir: str, allow_change: bool) -> list[str]:
    """The keys in which ``config`` differs from ``model_dir/config.yaml`` (if any).

    Raises ConfigError naming them when one is outside RERUN_FREE_KEYS and
    ``allow_change`` is off. Writes nothing.
    """
    stored = run_directory.stored_config(model_dir)
    if stored is None:
        return []
    changed = config_differences(stored, to_dict(config))
    guarded = [k for k in changed if not k.startswith(RERUN_FREE_KEYS)]
    if guarded and not allow_change:
        raise ConfigError(
            f"{model_dir} was trained with another config; differing keys: {', '.join(guarded)}. "
            "Use a new model_dir, or pass --allow_config_change to resume with these changes "
            "(changes to the model's variables are refused either way)."
        )
    if changed:
        logging.warning("resuming %s with config changes: %s", model_dir, ", ".join(changed))
    return changed


def default_model_fn(config: ExperimentConfig) -> Callable[[], keras.Model]:
    """The ``model_fn`` of ``config``: ``build_model(config.model)`` (the detector of model.type)."""
    return lambda: build_model(config.model)


def evaluation_hook(config: ExperimentConfig, model_dir: str) -> EvaluationHook | None:
    """Evaluation on the eval split every ``train.eval_every`` steps (0: none)."""
    if config.train.eval_every <= 0:
        return None

    def evaluate_fn(model, step):
        from fpn_tf.evaluation.evaluate import evaluate  # imports pycocotools; only when used

        return evaluate(config, model=model, model_dir=model_dir, step=step)

    return EvaluationHook(config.train.eval_every, evaluate_fn, config.train.best_metric)


def train_dataset_fn(config: ExperimentConfig, model_dir: str | None = None, chief: bool = True) -> DatasetFn:
    """The ``dataset_fn`` of ``config``: ``build_dataset`` on the train split.

    Checks that ``model.num_classes`` fits the data's label map; the chief
    writes the label map to ``model_dir/label_map.json`` (read by export).
    """

    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        dataset, info = build_dataset(
            config.data,
            config.model.input,
            split="train",
            batch_size=config.train.batch_size,  # global; build_dataset divides by the replicas
            training=True,
            input_context=input_context,
            seed=config.train.seed,
        )
        if info.label_map.num_classes != config.model.num_classes:
            raise ValueError(
                f"model.num_classes={config.model.num_classes} but the training data has "
                f"{len(info.label_map)} categories; set model.num_classes={info.label_map.num_classes} "
                "(the categories + background)"
            )
        if chief and model_dir:
            run_directory.write_label_map(info.label_map, model_dir)
        return dataset

    return dataset_fn


def with_train_overrides(config: ExperimentConfig, train_steps: int | None, batch_size: int | None):
    """``config`` with ``train.train_steps`` / ``train.batch_size`` replaced where given."""
    train_cfg = config.train
    if train_steps is not None:
        train_cfg = dataclasses.replace(train_cfg, train_steps=int(train_steps))
    if batch_size is not None:
        train_cfg = dataclasses.replace(train_cfg, batch_size=int(batch_size))
    return dataclasses.replace(config, train=train_cfg)


def train(
    config: ExperimentConfig,
    model_dir: str,
    strategy_name: str = "one_device",
    num_gpus: int | None = None,
    xla: bool | None = None,
    mixed_precision: str = "float32",
    train_steps: int | None = None,
    batch_size: int | None = None,
    init_checkpoint: str | None = None,
    strategy: tf.distribute.Strategy | None = None,
    model_fn: Callable[[], keras.Model] | None = None,
    dataset_fn: DatasetFn | None = None,
    allow_config_change: bool = False,
) -> TrainResult:
    """Trains ``config``'s model into ``model_dir`` (resuming if it holds a checkpoint).

    Args:
        config: the experiment; ``train_steps`` / ``batch_size`` override
            ``config.train`` and the result is written to ``model_dir/config.yaml``.
        strategy_name, num_gpus: see ``fpn_tf.training.distribute.make_strategy``
            (ignored when ``strategy`` is given).
        xla: compile the per-replica step with XLA; None = ``auto_xla(strategy)``
            (per device type, see fpn_tf/training/xla_choice.py).
        mixed_precision: float32 | mixed_float16 | mixed_bfloat16.
        init_checkpoint: initial weights for a fresh run (``load_init_checkpoint``).
        model_fn, dataset_fn: default to ``build_model(config.model)`` and
            ``build_dataset(config.data, ...)`` on the train split.
        allow_config_change: resume a ``model_dir`` whose ``config.yaml`` differs
            from ``config`` in more than RERUN_FREE_KEYS (``check_rerun_config``).

    Its length is the argument list and this docstring; the body is the wiring in order.
    """
    if strategy is None:
        strategy = distribute.make_strategy(strategy_name, num_gpus=num_gpus)
    config = with_train_overrides(config, train_steps, batch_size)
    train_cfg = config.train
    if xla is None:
        xla = auto_xla(strategy)
    keras.utils.set_random_seed(train_cfg.seed)
    # The chief holds model_dir/train.lock while it trains: a second run on the same
    # directory is refused before it reads or writes anything there.
    with run_directory.training_lock(model_dir, enabled=distribute.is_chief(strategy)):
        changed = check_rerun_config(config, model_dir, allow_config_change)
        logging.info(
            "training %d steps, global batch %d on %d replica(s) (%s), xla=%s, %s",
            *(train_cfg.train_steps, train_cfg.batch_size, strategy.num_replicas_in_sync),
            *(type(strategy).__name__, xla, mixed_precision),
        )
        try:
            trainer = Trainer(
                model_fn or default_model_fn(config),
                train_cfg,
                model_dir,
                strategy=strategy,
                xla=xla,
                mixed_precision=mixed_precision,
                init_checkpoint=init_checkpoint,
            )
        except ValueError as e:
            if not changed:
                raise
            raise ConfigError(
                f"{model_dir} holds a run whose variables do not fit the changed config "
                f"({', '.join(changed)}); nothing was changed in {model_dir}. Train into a new model_dir. {e}"
            ) from None
        # Only now, with the checkpoint known to fit, the directory's record is (re)written.
        if trainer.is_chief:
            run_directory.write_config(config, model_dir)
        hooks = trainer.default_hooks()
        eval_hook = evaluation_hook(config, model_dir)
        if eval_hook is not None:
            hooks.append(eval_hook)
        return trainer.fit(dataset_fn or train_dataset_fn(config, model_dir, trainer.is_chief), hooks)
