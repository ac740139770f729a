"""The feature cache: a frozen stage trained on cached features gives the model a plain one would."""

from __future__ import annotations

import re

import numpy as np
import pytest

from helpers import tiny_recipe
from tfsft import config as config_module
from tfsft.model import load
from tfsft.training import fit, uses_feature_cache


def head_weights_after(tmp_path, shapes_dir, cache: str, name: str):
    stages = f"""
      - {{name: head, epochs: 3, learning_rate: 1.0e-2, trainable: head, cache_features: {cache},
         label_smoothing: 0.1, class_weight: balanced}}"""
    path = tmp_path / f"{name}.yaml"
    path.write_text(tiny_recipe(shapes_dir, str(tmp_path / name), stages))
    config = config_module.load(str(path), ["model.backbone=resnet50v2"])
    lines = []
    result = fit(config, log=lines.append)
    model = load(str(tmp_path / name / "model.keras"))
    return model.get_layer("predictions").get_weights(), result.metrics, lines


def test_cached_head_stage_equals_the_plain_one(tmp_path, shapes_dir):
    cached, cached_metrics, cached_log = head_weights_after(tmp_path, shapes_dir, "true", "cached")
    plain, plain_metrics, plain_log = head_weights_after(tmp_path, shapes_dir, "false", "plain")
    assert any("on cached backbone features" in line for line in cached_log)
    assert not any("cached" in line for line in plain_log)
    assert not np.allclose(plain[0], 0), "the head did not train"
    for a, b in zip(cached, plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert cached_metrics["val_loss"] == pytest.approx(plain_metrics["val_loss"], rel=1e-4)


def test_cache_is_used_by_default_only_for_frozen_unaugmented_stages(tmp_path):
    from tfsft.config import AugmentConfig, StageConfig

    head = StageConfig(epochs=1, learning_rate=0.1, trainable="head")
    assert uses_feature_cache(head, None)
    assert uses_feature_cache(head, AugmentConfig())  # every transform off
    assert not uses_feature_cache(head, AugmentConfig(flip="horizontal"))
    forced = StageConfig(epochs=1, learning_rate=0.1, trainable="head", cache_features=True)
    assert forced.cache_features == "true" and uses_feature_cache(forced, AugmentConfig(flip="horizontal"))
    assert not uses_feature_cache(StageConfig(epochs=1, learning_rate=0.1, trainable="all"), None)
    assert not uses_feature_cache(StageConfig(epochs=1, learning_rate=0.1, cache_features=False), None)


def weights_after_image_stage(tmp_path, shapes_dir, cache: str):
    stages = """
      - {name: finetune, epochs: 2, learning_rate: 1.0e-3, trainable: top_blocks:1}"""
    path = tmp_path / f"{cache}.yaml"
    path.write_text(tiny_recipe(shapes_dir, str(tmp_path / cache), stages,
                                extra="") .replace("  batch_size: 8\n", f"  batch_size: 8\n  cache: {cache}\n"
                                                   ""))
    config = config_module.load(str(path), ["model.backbone=resnet50v2"])
    lines = []
    fit(config, log=lines.append)
    model = load(str(tmp_path / cache / "model.keras"))
    return [w.numpy() for w in model.weights], lines


def test_decoded_image_cache_trains_exactly_as_reading_the_files(tmp_path, shapes_dir):
    # Disk mode here; memory mode serves the same rows from memory (next test).
    plain, plain_log = weights_after_image_stage(tmp_path, shapes_dir, "none")
    cached, log = weights_after_image_stage(tmp_path, shapes_dir, "disk")
    assert any(re.match(r"cached \d+ decoded train images \(memory-mapped", line) for line in log), log
    assert not (tmp_path / "disk" / "image_cache").exists()  # removed when the run ends
    for a, b in zip(cached, plain):  # same images, same order
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not any("decoded" in line for line in plain_log)


def test_decoded_image_cache_keeps_the_order_and_still_augments(tmp_path, shapes_dir):
    from tfsft import data as data_module
    from tfsft.config import AugmentConfig, DataConfig
    from tfsft.features import ImageCache

    data = data_module.build(DataConfig(train=shapes_dir, image_size=[32, 32], batch_size=8), 0)
    augment = AugmentConfig(flip="horizontal_and_vertical", rotation=0.2)
    files = data_module.pipeline(data.train, 3, (32, 32), 8, training=True, augment=augment, seed=0)
    cache = ImageCache(data, (32, 32), 8, 0, augment, "memory", str(tmp_path / "c"), log=lambda line: None)
    cached, plain = cache.train_dataset(), cache.ordered("train")
    for epoch in range(2):  # the same labels in the same order as reading the files, every epoch
        for (_, file_labels), (_, cached_labels) in zip(files, cached):
            np.testing.assert_array_equal(file_labels, cached_labels)
    augmented = np.concatenate([images for images, _ in cached])
    ordered = np.concatenate([images for images, _ in plain])
    assert not np.allclose(np.sort(augmented.ravel()), np.sort(ordered.ravel()), atol=1.0)
