"""``fit(config)``: one run, top to bottom.

    prepare the run directory -> read the data -> build the model
    -> for each stage: set trainable, new optimizer, compile, fit (epochs carried on)
    -> save model.keras -> metrics.json, confusion matrix, training curves
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from tfsft.tfimport import tf  # noqa: F401  (imports TensorFlow quietly, before Keras)
import keras

from tfsft import config as config_module
from tfsft import data as data_module
from tfsft import distribute
from tfsft import evaluate, runs
from tfsft.config import Config, StageConfig
from tfsft.errors import ModelError, RunDirError, TfsftError, first_line
from tfsft.features import FOLDER as FEATURE_FOLDER
from tfsft.features import IMAGE_FOLDER, FeatureCache, ImageCache
from tfsft.loop import fit_distributed
from tfsft.model import BACKBONE_LAYER, build_classifier, resolve_backbone, set_trainable

Log = Callable[[str], None]


@dataclass
class RunResult:
    """What a finished run hands back: where it wrote, and its validation metrics."""

    run_dir: str
    metrics: dict[str, Any]


def fit(config: Config, *, restart: bool = False, log: Log = print) -> RunResult:
    """Trains, evaluates and saves one run as ``config`` describes.

    A run directory holding an unfinished run (killed, preempted, stopped by a NaN loss) is
    resumed from its newest readable checkpoint: same stage, epoch, weights, optimizer state
    and learning-rate schedule position; only the epoch in progress is lost.

    Args:
        config: a validated config (``tfsft.config.load``).
        restart: start over in a run directory that already holds a run.
        log: where progress lines go.
    """
    started = time.time()
    policy = keras.mixed_precision.global_policy()
    # First: MultiWorkerMirroredStrategy must exist before TensorFlow runs anything.
    distribution = distribute.setup(config.distribute, log)
    worker_dir = None if distribution.is_chief else tempfile.mkdtemp(prefix="tfsft-worker-")
    try:
        resolve_backbone(config)  # before anything is written: a bad Hub handle fails here
        run_dir = config.run.dir if worker_dir is None else worker_run_dir(config.run.dir, worker_dir)
        return _fit(config, distribution, run_dir, restart, log, started)
    except _PEER_ERRORS as error:
        if distribution.kind != "multi_worker":
            raise
        reason = first_line(error, 200)
        raise TrainingStopped(f"{distribution.task}: another worker of the cluster stopped or cannot "
                              f"be reached ({reason}); the chief's run keeps its last checkpoint. Fix: "
                              f"see that worker's output, then start every worker again with the "
                              f"same command to resume") from None
    finally:
        keras.mixed_precision.set_global_policy(policy)  # as it was, for whatever runs next
        if worker_dir is not None:
            shutil.rmtree(worker_dir, ignore_errors=True)


# What a collective operation raises when a peer worker is gone.
_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.DeadlineExceededError,
                tf.errors.AbortedError)


def worker_run_dir(run_dir: str, worker_dir: str) -> str:
    """A non-chief worker writes to a temporary copy of the run directory: the chief's
    checkpoints, when the run directory is on storage every worker reads (to resume in step)."""
    copy = os.path.join(worker_dir, "run")
    if os.path.isdir(run_dir):
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(runs.LOGS))
    return copy


def _fit(config: Config, distribution: distribute.Distribution, run_dir: str, restart: bool,
         log: Log, started: float) -> RunResult:
    run = runs.RunDir.prepare(run_dir, restart)
    checkpoints = run.checkpoints()
    if checkpoints:
        check_resumable(config, run)
    if config.export.name and distribution.is_chief:
        runs.check_writable(os.path.join(config.export.base, config.export.name), "export folder",
                            "change export.base or fix its permissions")
    run.write_text(runs.CONFIG, config_module.dump(config))

    data = data_module.build(config.data, config.run.seed)
    class_names = data.class_names
    run.write_text(runs.CLASS_NAMES, "".join(f"{name}\n" for name in class_names))
    if data.skipped:
        run.write_jsonl(runs.SKIPPED, ({"path": path, "reason": reason} for path, reason in data.skipped))
        log(f"skipped {len(data.skipped)} files that are not usable images; see {run.path(runs.SKIPPED)}")
    data_module.check_bad_fraction(data, config.data.max_bad_fraction)
    log(f"data: {len(data.train)} training and {len(data.val)} validation images, "
        f"{len(class_names)} classes")

    keras.utils.set_random_seed(config.run.seed)
    with distribution.strategy.scope():
        model, weights_used = build_classifier(config.model, len(class_names), config.image_size)
    if weights_used.startswith("none (random initialisation:"):
        log(f"warning: ImageNet weights for {config.model.backbone} cannot be loaded "
            f"({weights_used.split('unavailable: ')[-1][:-1]}); training from random initialisation "
            f"(weights: auto). Results will be far below a pretrained start.")
    for index, stage in enumerate(config.stages):  # every stage's setting, before any training
        try:
            set_trainable(model, stage.trainable, stage.batchnorm)
        except ModelError as error:
            raise ModelError(f"stages.{index} ({stage.name}): {error}") from None
    log(f"model: {config.model.backbone} at {config.image_size[0]}x{config.image_size[1]}, "
        f"weights: {weights_used.split(' (')[0]}, {model.count_params():,} parameters")

    image_size, batch_size, seed = config.image_size, config.data.batch_size, config.run.seed
    steps = data_module.steps_per_epoch(data.train, batch_size)
    images = (ImageCache(data, image_size, batch_size, seed, config.data.augment, config.data.cache,
                         run.path(IMAGE_FOLDER), log) if config.data.cache != "none" else None)

    def train_data():
        if images is not None:
            return images.train_dataset()
        return data_module.pipeline(data.train, len(class_names), image_size, batch_size,
                                    training=True, augment=config.data.augment, seed=seed)

    def val_data():
        if images is not None:
            return images.val_dataset()
        return data_module.pipeline(data.val, len(class_names), image_size, batch_size, training=False)

    cache = FeatureCache(model, data, image_size, batch_size, seed, run.path(FEATURE_FOLDER), log,
                         images=images.ordered if images is not None else None)

    def prepare_stage(index: int) -> StageSetup:
        stage = config.stages[index]
        set_trainable(model, stage.trainable, stage.batchnorm)
        if uses_feature_cache(stage, config.data.augment):
            setup = StageSetup(cache.head_model(), cache.train_dataset(), cache.val_dataset(), cached=True)
        else:
            if stage.trainable != "head":
                cache.invalidate()  # this stage changes the backbone
            setup = StageSetup(model, train_data(), val_data(), cached=False)
        with distribution.strategy.scope():
            compile_for_stage(setup.model, stage, steps, len(class_names), distribution.jit_compile,
                              # The head on cached features is tiny: a step costs less than the
                              # Python call around it, so one call runs many steps.
                              steps_per_execution=min(steps, 64) if setup.cached else 1)
        return setup

    history: list[dict[str, Any]] = []
    try:
        resumed, setup = resume(run, checkpoints, model, prepare_stage, log) if checkpoints else (None, None)
        point = resumed or runs.Checkpoint("start", 0, 0, 0, [], has_optimizer=False)
        if distribution.kind == "multi_worker":
            check_workers_agree(distribution, point.epoch)
        history = list(point.history)
        run.write_csv(runs.HISTORY, history)
        epoch = point.epoch
        # A checkpoint that holds every weight, with the backbone as it is now: what a stage on
        # cached features checkpoints its head on top of, instead of rewriting the whole model.
        backbone_saved = (point.base or point.name) if resumed else None
        stage_seconds: dict[str, float] = {}
        with TerminationSignal() as termination:
            for index, stage in enumerate(config.stages):
                if index < point.stage_index or stage.epochs == 0:
                    continue
                stage_started = time.time()
                continuing = setup is not None and index == point.stage_index
                stage_start = point.stage_start_epoch if continuing else epoch
                if not continuing:
                    setup = prepare_stage(index)
                base = None
                if setup.cached:
                    if backbone_saved is None:
                        backbone_saved = f"stage-{index + 1:02d}-start"
                        run.save_checkpoint(model, None, runs.Checkpoint(
                            backbone_saved, index, epoch, epoch, list(history), has_optimizer=False))
                    base = backbone_saved
                trainable_count = sum(int(keras.ops.size(w)) for w in model.trainable_weights)
                log(f"stage {stage.name}: {stage.epochs} epochs, trainable {stage.trainable} "
                    f"({trainable_count:,} parameters), {stage.optimizer} lr {stage.learning_rate:g} "
                    f"{stage.schedule}" + (", on cached backbone features" if setup.cached else "")
                    + (f", resuming after epoch {epoch}" if continuing else ""))
                guard = Guard(termination)
                interactive = sys.stdout.isatty()
                callbacks: list[keras.callbacks.Callback] = [
                    guard,
                    EpochEnd(run, model, stage, index, stage_start, history, guard, base,
                             log=None if interactive else log),
                ]
                if distribution.kind != "multi_worker":  # it needs fit's train function
                    callbacks.append(keras.callbacks.TensorBoard(run.path(runs.LOGS)))
                if stage.early_stopping is not None:
                    callbacks.append(keras.callbacks.EarlyStopping(
                        monitor=stage.early_stopping.monitor, patience=stage.early_stopping.patience,
                        min_delta=stage.early_stopping.min_delta, restore_best_weights=True))
                class_weight = (data_module.class_weights(data.train.labels, len(class_names))
                                if stage.class_weight == "balanced" else None)
                if epoch < stage_start + stage.epochs and distribution.kind == "multi_worker":
                    # Keras' fit fails under MultiWorkerMirroredStrategy; a worker that stops makes
                    # the others' collectives fail, which fit() above turns into one line.
                    fit_distributed(setup.model, distribution.strategy, setup.train, setup.val,
                                    initial_epoch=epoch, epochs=stage_start + stage.epochs,
                                    steps_per_epoch=steps, callbacks=callbacks, class_weight=class_weight)
                elif epoch < stage_start + stage.epochs:
                    setup.model.fit(setup.train, validation_data=setup.val, initial_epoch=epoch,
                                    epochs=stage_start + stage.epochs, class_weight=class_weight,
                                    callbacks=callbacks, verbose=1 if interactive else 0)
                guard.raise_if_stopped(stage, index, history)
                epoch = history[-1]["epoch"] if history else epoch
                # A stage boundary: the weights as the stage left them (best weights, after early
                # stopping), from which the next stage starts with a new optimizer.
                done = f"stage-{index + 1:02d}-done"
                run.save_checkpoint(model, None, runs.Checkpoint(
                    done, index + 1, epoch, epoch, list(history), has_optimizer=False, base=base),
                    changed=setup.model.weights if base else None)
                backbone_saved = base or done
                stage_seconds[stage.name] = round(time.time() - stage_started, 2)
                setup = None
    except tf.errors.InvalidArgumentError:
        raise_for_undecodable(data, history)
        raise
    cache.invalidate()

    if distribution.kind == "multi_worker":  # equal on every worker when they trained in step
        log(f"{distribution.task}: final weights fingerprint {weights_fingerprint(model)}")
    if not distribution.is_chief:  # the chief evaluates, saves and exports
        return RunResult(run.root, {})
    model_path = run.temporary_path(runs.MODEL)
    # Saved uncompiled and in float32 (the same layers and weights, without the last stage's
    # optimizer, whose state is twice the weights for Adam, and without a mixed-precision policy).
    model = distribute.float32_copy(model)
    model.save(model_path)
    os.replace(model_path, run.path(runs.MODEL))

    evaluation_started = time.time()
    true, probabilities = evaluate.predict(model, val_data())
    if images is not None:
        images.remove()
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
        "resumed_from_epoch": resumed.epoch if resumed else None,
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
    run.mark_finished()
    export_after_fit(config, run.root, log)
    return RunResult(run.root, metrics)


@dataclass
class StageSetup:
    """What one stage fits: the full model on images, or the head alone on cached features."""

    model: keras.Model
    train: Any
    val: Any
    cached: bool


def raise_for_undecodable(data: data_module.Data, history: list[dict[str, Any]]) -> None:
    """After a decode error in fit: names the files that cannot be decoded, if that was it."""
    failed = data_module.find_undecodable((data.train.paths or []) + (data.val.paths or []))
    if failed:
        kept = f"epoch {history[-1]['epoch']}" if history else "the start of the run"
        raise TrainingStopped(f"{len(failed)} image file(s) passed the checks but cannot be decoded: "
                              f"{', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''}; the run is "
                              f"saved up to {kept}. Fix: remove or repair them and run the same command "
                              f"to resume")


def compile_for_stage(target: keras.Model, stage: StageConfig, steps_per_epoch: int, num_classes: int,
                      jit_compile: bool = False, steps_per_execution: int = 1) -> None:
    """Compiles with a fresh optimizer for the stage, built so its state exists before any step.
    ``jit_compile`` is passed explicitly: Keras' ``auto`` turns XLA off under any strategy."""
    backbone = next((layer for layer in target.layers if layer.name == BACKBONE_LAYER), None)
    target.compile(
        optimizer=make_optimizer(stage, steps_per_epoch,
                                 backbone.trainable_variables if backbone is not None else ()),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=stage.label_smoothing),
        metrics=make_metrics(num_classes),
        jit_compile=jit_compile,
        steps_per_execution=steps_per_execution,
    )
    target.optimizer.build(target.trainable_variables)


def weights_fingerprint(model: keras.Model) -> str:
    """A short hash of every weight's bytes."""
    import hashlib

    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
    return digest.hexdigest()[:16]


def check_workers_agree(distribution: distribute.Distribution, epoch: int) -> None:
    """Every worker must start from the same checkpoint: compared across workers (a collective)
    before training, so a worker that cannot read the chief's run directory stops all of them."""
    strategy = distribution.strategy
    values = strategy.run(lambda: tf.constant([1.0, float(epoch), float(epoch) ** 2]))
    count, total, squares = strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None).numpy()
    if abs(count * squares - total ** 2) > 0.5:  # equal epochs on every replica, else not
        raise RunDirError(f"{distribution.task}: the workers would resume from different epochs (this "
                          f"one from epoch {epoch}); the run directory must be on storage every "
                          f"worker reads (a shared file system, GCS). Fix: point run.dir there, or "
                          f"pass --restart on every worker")


def uses_feature_cache(stage: StageConfig, augment) -> bool:
    """A frozen (head) stage trains on cached features when asked, or by default when no random
    augmentation would make every epoch's images different."""
    if stage.trainable != "head" or stage.cache_features == "false":
        return False
    augmented = augment is not None and (augment.flip != "none" or augment.rotation or augment.zoom
                                         or augment.contrast)
    return stage.cache_features == "true" or not augmented


def resume(run: runs.RunDir, checkpoints: list[runs.Checkpoint], model: keras.Model,
           prepare_stage: Callable[[int], "StageSetup"], log: Log) -> tuple[runs.Checkpoint, Optional["StageSetup"]]:
    """Loads the newest readable checkpoint into ``model``; for a checkpoint inside a stage, also
    prepares that stage and loads its optimizer state. Returns the checkpoint and the setup."""
    for point in reversed(checkpoints):
        setup = None
        try:
            run.load_weights(point, model)
            if point.has_optimizer:
                # Only the optimizer load below can fail for the checkpoint's sake; a failure in
                # preparing the stage (reading images) is not the checkpoint's and propagates.
                setup = prepare_stage(point.stage_index)
                run.load_optimizer(point, setup.model.optimizer)
        except (OSError, ValueError, KeyError) as error:  # a truncated or foreign file
            log(f"warning: checkpoint {point.name} is unreadable ({first_line(error, 160)}); "
                f"falling back to the one before")
            continue
        log(f"resuming {run.root} after epoch {point.epoch} (checkpoint {point.name})")
        return point, setup
    raise RunDirError(f"{run.root} holds an unfinished run but none of its checkpoints can be read. "
                      f"Fix: pass --restart to start over")


# Keys a resumed run may change: a lower learning rate after a NaN, more epochs.
_RESUMABLE_CHANGES = re.compile(r"^(stages\.\d+\.(learning_rate|epochs)|distribute\.(strategy|jit_compile))$")


def check_resumable(config: Config, run: runs.RunDir) -> None:
    """Refuses to resume a run whose config differs in anything but learning rates and epochs."""
    import yaml

    with open(run.path(runs.CONFIG), encoding="utf-8") as handle:
        saved = _flatten(yaml.safe_load(handle))
    current = _flatten(yaml.safe_load(config_module.dump(config)))
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key) and not _RESUMABLE_CHANGES.match(key):
            raise RunDirError(f"{run.root} holds an unfinished run with a different config ({key}: "
                              f"{saved.get(key)!r} there, {current.get(key)!r} now); nothing was changed. "
                              f"Fix: run the same config to resume it, --restart to start over, or "
                              f"--run-dir for a new run")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return {k: v for index, item in enumerate(value) for k, v in _flatten(item, f"{prefix}{index}.").items()}
    return {prefix[:-1]: value}


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


def make_optimizer(stage: StageConfig, steps_per_epoch: int,
                   backbone_variables: Sequence[Any] = ()) -> keras.optimizers.Optimizer:
    """A fresh optimizer for one stage, with its learning-rate schedule; ``backbone_variables``
    learn at ``backbone_lr_multiplier`` times the rate when the stage sets one."""
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
        optimizer_class, options = keras.optimizers.AdamW, {"weight_decay": weight_decay}
    elif stage.optimizer == "sgd":
        optimizer_class = keras.optimizers.SGD
        options = {"momentum": stage.momentum, "weight_decay": stage.weight_decay}
    else:
        optimizer_class, options = keras.optimizers.Adam, {"weight_decay": stage.weight_decay}
    if stage.backbone_lr_multiplier != 1.0:
        return _discriminative(optimizer_class)(
            learning_rate, backbone_variables=backbone_variables,
            multiplier=stage.backbone_lr_multiplier, **options)
    return optimizer_class(learning_rate, **options)


_DISCRIMINATIVE: dict[type, type] = {}


def _discriminative(optimizer_class: type) -> type:
    """``optimizer_class`` with a second learning rate for the backbone's variables.

    Keras 3 optimizers take one rate; this subclass scales it per variable in ``update_step``
    (every Keras optimizer's per-variable update) and in the decoupled weight decay, so Adam's
    and AdamW's steps, not only their gradients, are smaller for the backbone. The optimizer's
    variables are the base class's: checkpoints and resuming are unchanged.
    """
    if optimizer_class not in _DISCRIMINATIVE:
        class Discriminative(optimizer_class):
            def __init__(self, *args, backbone_variables=(), multiplier=1.0, **kwargs):
                super().__init__(*args, **kwargs)
                self._backbone_variables = list(backbone_variables)
                self._multiplier = float(multiplier)
                self._scales: list[float] = []
                self._rate_scale = 1.0

            def build(self, variables):
                super().build(variables)
                backbone = {self._var_key(variable) for variable in self._backbone_variables}
                self._scales = [self._multiplier if self._var_key(variable) in backbone else 1.0
                                for variable in variables]

            def update_step(self, gradient, variable, learning_rate):
                scale = self._scales[self._get_variable_index(variable)]
                return super().update_step(gradient, variable, learning_rate * scale)

            def _get_current_learning_rate(self):
                # Read by the weight decay below; 1.0 everywhere else.
                return super()._get_current_learning_rate() * self._rate_scale

            def _apply_weight_decay(self, variables):
                backbone = [self._scales[self._get_variable_index(v)] != 1.0 for v in variables]
                super()._apply_weight_decay([v for v, scaled in zip(variables, backbone) if not scaled])
                self._rate_scale = self._multiplier
                try:
                    super()._apply_weight_decay([v for v, scaled in zip(variables, backbone) if scaled])
                finally:
                    self._rate_scale = 1.0

        Discriminative.__name__ = Discriminative.__qualname__ = f"Discriminative{optimizer_class.__name__}"
        _DISCRIMINATIVE[optimizer_class] = Discriminative
    return _DISCRIMINATIVE[optimizer_class]


def make_metrics(num_classes: int) -> list[keras.metrics.Metric]:
    metrics: list[keras.metrics.Metric] = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(k=5, name="top5_accuracy"))
    return metrics


class TrainingStopped(TfsftError):
    """Training stopped before the stage ended; the run can be resumed."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class TerminationSignal:
    """Within the block, SIGTERM (preemption) asks training to stop after the current step
    instead of killing the process, so the run ends cleanly at its last checkpoint."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


class Guard(keras.callbacks.Callback):
    """Stops fit at the first non-finite loss, or on SIGTERM, before the epoch is recorded."""

    def __init__(self, termination: TerminationSignal):
        super().__init__()
        self.termination = termination
        self.reason: Optional[str] = None
        self.where = (0, 0)
        self.loss = 0.0

    @property
    def stopped(self) -> bool:
        return self.reason is not None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.reason, self.where, self.loss = "loss", (self.epoch + 1, batch + 1), float(loss)
        elif self.termination.received:
            self.reason, self.where = "sigterm", (self.epoch + 1, batch + 1)
        if self.reason:
            self.model.stop_training = True

    def raise_if_stopped(self, stage: StageConfig, index: int, history: list[dict[str, Any]]) -> None:
        if self.reason is None:
            return
        kept = f"epoch {history[-1]['epoch']}" if history else "the start of the run"
        epoch, step = self.where
        if self.reason == "loss":
            lower = f"{stage.learning_rate / 10:g}"
            raise TrainingStopped(
                f"the loss became {self.loss} in stage {stage.name}, epoch {epoch}, step {step}; "
                f"training stopped and the last good checkpoint ({kept}) is kept. Fix: lower the "
                f"learning rate (e.g. --set stages.{index}.learning_rate={lower}) and run the same "
                f"command to resume")
        raise TrainingStopped(
            f"stopped by SIGTERM in stage {stage.name}, epoch {epoch}, step {step}; the run is saved "
            f"up to {kept}. Run the same command to resume", exit_code=143)


class EpochEnd(keras.callbacks.Callback):
    """At the end of every completed epoch, in this order: append its history row (stage,
    learning rate, metrics, seconds) and rewrite history.csv; save a checkpoint (the full
    classifier's weights, or with ``base`` only the weights of the model being fit, the head on
    cached features; and that model's optimizer state); then, given ``log``, print the row as
    one line. The line comes last, so whoever reads it knows the epoch is saved."""

    def __init__(self, run: runs.RunDir, classifier: keras.Model, stage: StageConfig, stage_index: int,
                 stage_start: int, rows: list[dict[str, Any]], guard: "Guard", base: Optional[str] = None,
                 log: Optional[Log] = None):
        super().__init__()
        self.run, self.classifier, self.stage, self.stage_index = run, classifier, stage, stage_index
        self.stage_start, self.rows, self.guard, self.base, self.log = stage_start, rows, guard, base, log

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.stopped:
            return
        learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        metrics = {key: float(value) for key, value in (logs or {}).items() if key != "learning_rate"}
        seconds = round(time.time() - self.epoch_started, 3)
        self.rows.append({"stage": self.stage.name, "epoch": epoch + 1, "learning_rate": learning_rate,
                          **metrics, "seconds": seconds})
        self.run.write_csv(runs.HISTORY, self.rows)
        self.run.save_checkpoint(self.classifier, list(self.model.optimizer.variables), runs.Checkpoint(
            f"epoch-{epoch + 1:04d}", self.stage_index, self.stage_start, epoch + 1, list(self.rows),
            base=self.base), changed=self.model.weights if self.base else None)
        if self.log is not None:
            values = "  ".join(f"{key} {value:.4f}" for key, value in metrics.items())
            last = self.stage_start + self.stage.epochs
            self.log(f"[{self.stage.name}] epoch {epoch + 1}/{last}  {values}  ({seconds:.1f}s)")
