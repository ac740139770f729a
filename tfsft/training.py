"""``fit(config)``: one run, top to bottom.

    prepare the run directory -> read the data -> build the model
    -> for each stage: set trainable, new optimizer, compile, fit (epochs carried on)
    -> save model.keras -> metrics.json, confusion matrix, training curves
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from tfsft.tfimport import tf  # noqa: F401  (imports TensorFlow quietly, before Keras)
import keras

from tfsft import config as config_module
from tfsft import data as data_module
from tfsft import evaluate, runs
from tfsft.config import Config, StageConfig
from tfsft.model import BACKBONE_LAYER, build_classifier, set_trainable

Log = Callable[[str], None]


@dataclass
class RunResult:
    """What a finished run hands back: where it wrote, and its validation metrics."""

    run_dir: str
    metrics: dict[str, Any]


def fit(config: Config, *, restart: bool = False, log: Log = print) -> RunResult:
    """Trains, evaluates and saves one run as ``config`` describes.

    Args:
        config: a validated config (``tfsft.config.load``).
        restart: start over in a run directory that already holds a run.
        log: where progress lines go.
    """
    started = time.time()
    run = runs.RunDir.prepare(config.run.dir, restart)
    if config.export.name:
        from tfsft.export import check_writable

        check_writable(os.path.join(config.export.base, config.export.name))
    run.write_text(runs.CONFIG, config_module.dump(config))

    data = data_module.build(config.data, config.run.seed)
    class_names = data.class_names
    run.write_text(runs.CLASS_NAMES, "".join(f"{name}\n" for name in class_names))
    if data.skipped:
        run.write_jsonl(runs.SKIPPED, ({"path": path, "reason": reason} for path, reason in data.skipped))
        log(f"skipped {len(data.skipped)} files that are not usable images; see {run.path(runs.SKIPPED)}")
    log(f"data: {len(data.train)} training and {len(data.val)} validation images, "
        f"{len(class_names)} classes")

    keras.utils.set_random_seed(config.run.seed)
    model, weights_used = build_classifier(config.model, len(class_names), config.image_size)
    if weights_used.startswith("none (random initialisation:"):
        log(f"warning: ImageNet weights for {config.model.backbone} cannot be loaded "
            f"({weights_used.split('unavailable: ')[-1][:-1]}); training from random initialisation "
            f"(weights: auto). Results will be far below a pretrained start.")
    log(f"model: {config.model.backbone} at {config.image_size[0]}x{config.image_size[1]}, "
        f"weights: {weights_used.split(' (')[0]}, {model.count_params():,} parameters")

    image_size, batch_size, seed = config.image_size, config.data.batch_size, config.run.seed
    train_data = data_module.pipeline(data.train, len(class_names), image_size, batch_size,
                                      training=True, augment=config.data.augment, seed=seed)
    val_data = data_module.pipeline(data.val, len(class_names), image_size, batch_size, training=False)
    steps = data_module.steps_per_epoch(data.train, batch_size)

    history: list[dict[str, Any]] = []
    stage_seconds: dict[str, float] = {}
    epoch = 0
    for stage in config.stages:
        if stage.epochs == 0:
            continue
        stage_started = time.time()
        set_trainable(model, config.model.backbone, stage.trainable, stage.batchnorm)
        model.compile(
            optimizer=make_optimizer(stage, steps),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=stage.label_smoothing),
            metrics=make_metrics(len(class_names)),
        )
        trainable_count = sum(int(keras.ops.size(w)) for w in model.trainable_weights)
        log(f"stage {stage.name}: {stage.epochs} epochs, trainable {stage.trainable} "
            f"({trainable_count:,} parameters), {stage.optimizer} lr {stage.learning_rate:g} "
            f"{stage.schedule}")
        interactive = sys.stdout.isatty()
        callbacks: list[keras.callbacks.Callback] = [
            HistoryRecorder(stage.name, history, run),
            keras.callbacks.TensorBoard(run.path(runs.LOGS)),
        ]
        if stage.early_stopping is not None:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor=stage.early_stopping.monitor, patience=stage.early_stopping.patience,
                min_delta=stage.early_stopping.min_delta, restore_best_weights=True))
        if not interactive:
            callbacks.append(EpochLine(stage.name, epoch + stage.epochs, log))
        class_weight = (data_module.class_weights(data.train.labels, len(class_names))
                        if stage.class_weight == "balanced" else None)
        result = model.fit(train_data, validation_data=val_data, initial_epoch=epoch,
                           epochs=epoch + stage.epochs, class_weight=class_weight,
                           callbacks=callbacks, verbose=1 if interactive else 0)
        epoch += len(result.epoch)
        stage_seconds[stage.name] = round(time.time() - stage_started, 2)

    model_path = run.temporary_path(runs.MODEL)
    model.save(model_path)
    os.replace(model_path, run.path(runs.MODEL))

    evaluation_started = time.time()
    true, probabilities = evaluate.predict(model, val_data)
    metrics = evaluate.compute_metrics(true, probabilities, class_names)
    metrics = {f"val_{key}" if key in ("loss", "accuracy", "top5_accuracy", "num_images") else key: value
               for key, value in metrics.items()}
    metrics.update({
        "backbone": config.model.backbone,
        "weights_used": weights_used,
        "image_size": list(image_size),
        "num_train_images": len(data.train),
        "num_skipped_files": len(data.skipped),
        "epochs": epoch,
        "timings": {
            "stage_seconds": stage_seconds,
            "evaluation_seconds": round(time.time() - evaluation_started, 2),
            "total_seconds": round(time.time() - started, 2),
        },
    })
    run.write_json(runs.METRICS, metrics)
    run.write_csv(runs.HISTORY, history)
    run.write_bytes(runs.CONFUSION_MATRIX,
                    evaluate.confusion_matrix_png(metrics["confusion_matrix"], class_names))
    if history:
        run.write_bytes(runs.TRAINING_CURVES, evaluate.training_curves_png(history))
    export_after_fit(config, run.root, log)
    return RunResult(run.root, metrics)


def export_after_fit(config: Config, run_dir: str, log: Log) -> None:
    """The exports the config asks for (``export.name``, ``export.tflite``), once training is done."""
    if config.export.name:
        from tfsft.export import export_run

        result = export_run(run_dir, name=config.export.name, base=config.export.base,
                            top_k=config.export.top_k, log=log)
        log(f"exported {result.path} for TF Serving (max difference from the trained model "
            f"{result.max_difference:.1e})")
    if config.export.tflite:
        from tfsft.tflite import convert_run, table

        reports, report_path, warning = convert_run(
            run_dir, modes=list(config.export.tflite), min_agreement=config.tflite.min_agreement,
            calibration_images=config.tflite.calibration_images, int8_input=config.tflite.int8_input,
            int8_output=config.tflite.int8_output, log=log)
        log(table(reports))
        log(f"TFLite report: {report_path}")
        if warning:
            log(f"warning: {warning}")


def make_optimizer(stage: StageConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """A fresh optimizer for one stage, with its learning-rate schedule."""
    learning_rate: Any = stage.learning_rate
    if stage.schedule == "cosine":
        total = stage.epochs * steps_per_epoch
        warmup = round(stage.warmup_epochs * steps_per_epoch)
        if warmup:
            learning_rate = keras.optimizers.schedules.CosineDecay(
                initial_learning_rate=0.0, decay_steps=max(1, total - warmup),
                warmup_target=stage.learning_rate, warmup_steps=warmup)
        else:
            learning_rate = keras.optimizers.schedules.CosineDecay(stage.learning_rate, decay_steps=total)
    if stage.optimizer == "adamw":
        weight_decay = 0.01 if stage.weight_decay is None else stage.weight_decay
        return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
    if stage.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=stage.momentum, weight_decay=stage.weight_decay)
    return keras.optimizers.Adam(learning_rate, weight_decay=stage.weight_decay)


def make_metrics(num_classes: int) -> list[keras.metrics.Metric]:
    metrics: list[keras.metrics.Metric] = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(k=5, name="top5_accuracy"))
    return metrics


class HistoryRecorder(keras.callbacks.Callback):
    """Appends one row per epoch (with its stage and learning rate) and rewrites history.csv."""

    def __init__(self, stage: str, rows: list[dict[str, Any]], run: runs.RunDir):
        super().__init__()
        self.stage, self.rows, self.run = stage, rows, run

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row = {"stage": self.stage, "epoch": epoch + 1, "learning_rate": learning_rate}
        row.update({key: float(value) for key, value in (logs or {}).items() if key != "learning_rate"})
        row["seconds"] = round(time.time() - self.epoch_started, 3)
        self.rows.append(row)
        self.run.write_csv(runs.HISTORY, self.rows)


class EpochLine(keras.callbacks.Callback):
    """One concise line per epoch, for logs and pipes where a progress bar would be noise."""

    def __init__(self, stage: str, last_epoch: int, log: Log):
        super().__init__()
        self.stage, self.last_epoch, self.log = stage, last_epoch, log

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        values = "  ".join(f"{key} {value:.4f}" for key, value in (logs or {}).items()
                           if key != "learning_rate")
        self.log(f"[{self.stage}] epoch {epoch + 1}/{self.last_epoch}  {values}  "
                 f"({time.time() - self.epoch_started:.1f}s)")
