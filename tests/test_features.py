"""The feature cache: a frozen stage trained on cached features gives the model a plain one would."""

from __future__ import annotations

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
