"""Staged training through ``training.fit``: what changes in each stage, and the per-stage options."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from helpers import tiny_recipe
from tfsft import backbones
from tfsft import config as config_module
from tfsft.model import build_classifier, load
from tfsft.training import fit, make_optimizer

import keras  # noqa: E402


def load_recipe(tmp_path, text, overrides=()):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return config_module.load(str(path), overrides)


def initial_model(config):
    """The model fit starts from: fit seeds Keras with run.seed before building it."""
    keras.utils.set_random_seed(config.run.seed)
    model, _ = build_classifier(config.model, 3, config.image_size)
    return model


def weights_by_path(model):
    return {weight.path: weight.numpy() for weight in model.weights}


def read_history(run_dir):
    with open(os.path.join(run_dir, "history.csv")) as handle:
        return list(csv.DictReader(handle))


def finetune_only(tmp_path, shapes_dir, batchnorm):
    stages = f"""
      - {{name: finetune, epochs: 2, learning_rate: 1.0e-2, trainable: top_blocks:1, batchnorm: {batchnorm}}}"""
    config = load_recipe(tmp_path, tiny_recipe(shapes_dir, str(tmp_path / "run"), stages),
                         ["model.backbone=resnet50"])
    before = weights_by_path(initial_model(config))
    fit(config, log=lambda line: None)
    after = weights_by_path(load(str(tmp_path / "run" / "model.keras")))
    assert before.keys() == after.keys()
    spec = backbones.BACKBONES["resnet50"]
    backbone = initial_model(config).get_layer("backbone")
    top_block = {layer.name for layer in backbones.assign_blocks(backbone, spec)[-1][1]}
    return before, after, top_block


def changed(before, after, path):
    return not np.array_equal(before[path], after[path])


def test_finetune_stage_trains_top_block_kernels_keeps_batchnorm_statistics_and_frozen_layers(tmp_path, shapes_dir):
    before, after, top_block = finetune_only(tmp_path, shapes_dir, "frozen")
    top_kernels = [p for p in before if p.split("/")[-2] in top_block and p.endswith("_conv/kernel")]
    assert top_kernels and all(changed(before, after, p) for p in top_kernels), "top block did not train"
    statistics = [p for p in before if p.endswith(("moving_mean", "moving_variance"))]
    assert statistics and not any(changed(before, after, p) for p in statistics), \
        "BatchNorm moving statistics changed in a batchnorm: frozen stage"
    frozen = [p for p in before if p.split("/")[-2] not in top_block | {"predictions"}]
    assert frozen and not any(changed(before, after, p) for p in frozen), "a frozen layer changed"
    assert changed(before, after, "predictions/kernel")


def test_batchnorm_train_does_update_statistics(tmp_path, shapes_dir):
    """The control for the test above: the same stage with batchnorm: train moves the statistics."""
    before, after, top_block = finetune_only(tmp_path, shapes_dir, "train")
    top_statistics = [p for p in before if p.split("/")[-2] in top_block and p.endswith("moving_mean")]
    assert top_statistics and all(changed(before, after, p) for p in top_statistics)
    lower_statistics = [p for p in before if p.endswith("moving_mean") and p.split("/")[-2] not in top_block]
    assert not any(changed(before, after, p) for p in lower_statistics)


def test_stages_continue_the_epoch_count_and_record_every_epoch(tmp_path, shapes_dir):
    stages = """
      - {name: head, epochs: 2, learning_rate: 1.0e-3, trainable: head, optimizer: adamw, label_smoothing: 0.1}
      - {name: middle, epochs: 2, learning_rate: 1.0e-3, trainable: top_blocks:2, optimizer: sgd, class_weight: balanced}
      - {name: last, epochs: 3, learning_rate: 1.0e-3, trainable: all, schedule: cosine, warmup_epochs: 1}"""
    config = load_recipe(tmp_path, tiny_recipe(shapes_dir, str(tmp_path / "run"), stages))
    result = fit(config, log=lambda line: None)
    rows = read_history(result.run_dir)
    assert [(r["stage"], int(r["epoch"])) for r in rows] == [
        ("head", 1), ("head", 2), ("middle", 3), ("middle", 4), ("last", 5), ("last", 6), ("last", 7)]
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds"):
        assert all(r[key] != "" for r in rows), key
    learning_rates = [float(r["learning_rate"]) for r in rows if r["stage"] == "last"]
    assert learning_rates[0] == pytest.approx(1e-3, rel=0.05), "warmup should reach the peak after 1 epoch"
    assert learning_rates[0] > learning_rates[1] > learning_rates[2], "cosine decay"
    assert result.metrics["epochs"] == 7


def test_optimizers_and_schedules():
    stage = config_module.StageConfig(epochs=4, learning_rate=0.1, optimizer="adamw")
    assert isinstance(make_optimizer(stage, 10), keras.optimizers.AdamW)
    assert make_optimizer(stage, 10).weight_decay == pytest.approx(0.01)
    sgd = make_optimizer(config_module.StageConfig(epochs=4, learning_rate=0.1, optimizer="sgd"), 10)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == pytest.approx(0.9)
    optimizer = make_optimizer(config_module.StageConfig(
        epochs=4, learning_rate=0.1, schedule="cosine", warmup_epochs=1), 10)
    optimizer.build([keras.Variable(np.zeros(2, dtype="float32"))])

    def learning_rate_at(step):
        optimizer.iterations.assign(step)
        return float(keras.ops.convert_to_numpy(optimizer.learning_rate))

    values = [learning_rate_at(step) for step in (0, 5, 10, 25, 40)]
    assert values[0] == pytest.approx(0.0)
    assert values[1] == pytest.approx(0.05, rel=1e-3)
    assert values[2] == pytest.approx(0.1, rel=1e-3)
    assert values[2] > values[3] > values[4]
    assert values[4] == pytest.approx(0.0, abs=1e-6)


def test_early_stopping_stops_and_restores_the_best_weights(tmp_path, shapes_dir):
    stages = """
      - {name: wild, epochs: 8, learning_rate: 5.0, trainable: all, optimizer: sgd,
         early_stopping: {monitor: val_loss, patience: 1}}"""
    config = load_recipe(tmp_path, tiny_recipe(shapes_dir, str(tmp_path / "run"), stages))
    result = fit(config, log=lambda line: None)
    rows = read_history(result.run_dir)
    assert len(rows) < 8, "a learning rate of 5 should make val_loss worsen and stop the stage"
    val_losses = [float(r["val_loss"]) for r in rows]
    best = int(np.argmin(val_losses))
    assert best < len(rows) - 1
    assert result.metrics["val_loss"] == pytest.approx(val_losses[best], rel=1e-3), \
        "the final model is not the best epoch's"
    with open(os.path.join(result.run_dir, "metrics.json")) as handle:
        assert json.load(handle)["epochs"] == len(rows)
