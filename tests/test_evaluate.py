"""Metrics computed from predictions, checked against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from tfsft.evaluate import compute_metrics, confusion_matrix_png, summary, training_curves_png


def test_metrics_match_a_hand_computed_example():
    true = np.array([0, 0, 1, 1, 2])
    probabilities = np.array([
        [0.8, 0.1, 0.1],   # 0 -> 0
        [0.3, 0.6, 0.1],   # 0 -> 1
        [0.1, 0.7, 0.2],   # 1 -> 1
        [0.2, 0.5, 0.3],   # 1 -> 1
        [0.5, 0.1, 0.4],   # 2 -> 0
    ])
    metrics = compute_metrics(true, probabilities, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    expected_loss = -np.mean(np.log([0.8, 0.3, 0.7, 0.5, 0.4]))
    assert metrics["loss"] == pytest.approx(expected_loss)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    a, b, c = (metrics["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(0.5), pytest.approx(0.5), 2)
    assert b["precision"] == pytest.approx(2 / 3) and b["recall"] == pytest.approx(1.0)
    assert b["f1"] == pytest.approx(0.8)
    assert (c["precision"], c["recall"], c["f1"]) == (0.0, 0.0, 0.0)
    assert "top5_accuracy" not in metrics
    assert summary(metrics) == f"accuracy 0.600, loss {expected_loss:.4f} on 5 images"


def test_top5_accuracy_for_more_than_five_classes():
    probabilities = np.tile(np.linspace(0.3, 0.01, 7), (2, 1))  # ranking 0, 1, 2, ..., 6
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    metrics = compute_metrics(np.array([4, 6]), probabilities, list("abcdefg"))
    assert metrics["accuracy"] == 0.0
    assert metrics["top5_accuracy"] == pytest.approx(0.5)


def test_pictures_are_png():
    assert confusion_matrix_png([[3, 1], [0, 4]], ["cat", "dog"]).startswith(b"\x89PNG")
    history = [{"stage": "head", "epoch": 1, "loss": 1.0, "accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.4},
               {"stage": "finetune", "epoch": 2, "loss": 0.8, "accuracy": 0.6, "val_loss": 0.9, "val_accuracy": 0.5}]
    assert training_curves_png(history).startswith(b"\x89PNG")
