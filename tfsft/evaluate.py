"""Metrics and the pictures a person looks at: confusion matrix and training curves.

The metrics are computed with numpy from the model's predictions, so they are the same whether
they come from ``tfsft fit`` or ``tfsft evaluate``.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import keras
    import tensorflow as tf


def predict(model: "keras.Model", dataset: "tf.data.Dataset") -> tuple[np.ndarray, np.ndarray]:
    """Runs ``model`` over a dataset of (images, one-hot labels); returns (true labels, probabilities)."""
    from tfsft.tfimport import tf

    # A compiled call rather than predict_on_batch, which fails under MultiWorkerMirroredStrategy.
    infer = tf.function(lambda images: model(images, training=False))
    true, probabilities = [], []
    for images, labels in dataset:
        probabilities.append(np.asarray(infer(images), dtype=np.float64))
        true.append(np.argmax(labels.numpy(), axis=-1))
    return np.concatenate(true), np.concatenate(probabilities)


def compute_metrics(true: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Loss, accuracy, top-5 accuracy (more than 5 classes), per-class report and confusion matrix."""
    num_classes = len(class_names)
    predicted = np.argmax(probabilities, axis=-1)
    picked = probabilities[np.arange(len(true)), true]
    metrics: dict[str, Any] = {
        "num_images": int(len(true)),
        "loss": float(np.mean(-np.log(np.clip(picked, 1e-7, 1.0)))),
        "accuracy": float(np.mean(predicted == true)),
    }
    if num_classes > 5:
        top5 = np.argsort(-probabilities, axis=-1)[:, :5]
        metrics["top5_accuracy"] = float(np.mean(np.any(top5 == true[:, None], axis=-1)))
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (true, predicted), 1)
    per_class = {}
    for index, name in enumerate(class_names):
        hits = matrix[index, index]
        support = matrix[index].sum()
        precision = hits / matrix[:, index].sum() if matrix[:, index].sum() else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall),
                           "f1": float(f1), "support": int(support)}
    metrics["per_class"] = per_class
    metrics["class_names"] = list(class_names)
    metrics["confusion_matrix"] = matrix.tolist()
    return metrics


def confusion_matrix_png(matrix: list[list[int]], class_names: list[str]) -> bytes:
    """A confusion matrix picture: rows are true classes, columns predicted, counts in the cells."""
    plt = _pyplot()
    counts = np.asarray(matrix)
    size = max(4.0, 0.5 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    row_totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, label="share of the true class")
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if len(class_names) <= 30:
        for row in range(len(class_names)):
            for column in range(len(class_names)):
                axes.text(column, row, str(counts[row, column]), ha="center", va="center",
                          color="white" if shares[row, column] > 0.5 else "black", fontsize=8)
    axes.set_title("Confusion matrix (validation)")
    return _png(figure)


def training_curves_png(history: list[dict[str, Any]]) -> bytes:
    """Loss and accuracy per epoch, training and validation, with stage boundaries marked."""
    plt = _pyplot()
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [row["epoch"] for row in history]
    for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
        axes.plot(epochs, [row.get(metric) for row in history], marker="o", label=f"train {metric}")
        axes.plot(epochs, [row.get(f"val_{metric}") for row in history], marker="o", label=f"val {metric}")
        previous: Optional[str] = None
        for row in history:
            if row["stage"] != previous:
                axes.axvline(row["epoch"] - 0.5, color="grey", linestyle=":")
                axes.annotate(row["stage"], (row["epoch"] - 0.45, 1.0), xycoords=("data", "axes fraction"),
                              va="top", fontsize=8, color="grey")
                previous = row["stage"]
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
        axes.legend(loc="best")
    figure.suptitle("Training curves")
    return _png(figure)


def summary(metrics: dict[str, Any]) -> str:
    """One readable line: accuracy, top-5 and loss on how many images."""
    parts = [f"accuracy {metrics['accuracy']:.3f}"]
    if "top5_accuracy" in metrics:
        parts.append(f"top-5 {metrics['top5_accuracy']:.3f}")
    parts.append(f"loss {metrics['loss']:.4f}")
    return f"{', '.join(parts)} on {metrics['num_images']} images"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    _pyplot().close(figure)
    return buffer.getvalue()


def evaluate_run(run_dir: str, data: Optional[str] = None, trust_model: bool = False) -> tuple[dict[str, Any], str]:
    """Recomputes metrics for a run's model on its validation split, or on ``data``.

    ``data`` is a folder, CSV or tfds:NAME[:SPLIT] whose classes are among the run's classes.
    Results go to ``<run_dir>/evaluation/<name>/`` (metrics.json, confusion_matrix.png), leaving
    the metrics written by fit untouched.

    Returns:
        The metrics and the folder they were written to.
    """
    import os

    from tfsft import config as config_module
    from tfsft import data as data_module
    from tfsft import runs
    from tfsft.model import load

    run = runs.RunDir(run_dir)
    class_names = run.read_class_names()
    config = config_module.load(run.path(runs.CONFIG), check_paths=False)
    if data is None:
        source = data_module.build(config.data, config.run.seed).val
        name = "val"
    else:
        source = data_module.read_source(data, "--data").relabel(class_names, f"--data {data}")
        name = os.path.basename(os.path.normpath(data.replace(":", "_"))) or "data"
    model = load(run.path(runs.MODEL), trust=trust_model)
    dataset = data_module.pipeline(source, len(class_names), config.image_size,
                                   config.data.batch_size, training=False)
    true, probabilities = predict(model, dataset)
    metrics = compute_metrics(true, probabilities, class_names)
    metrics["data"] = data or f"validation split of {config.data.train}"
    output = runs.RunDir(run.path(os.path.join("evaluation", name)))
    os.makedirs(output.root, exist_ok=True)
    output.write_json(runs.METRICS, metrics)
    output.write_bytes(runs.CONFUSION_MATRIX, confusion_matrix_png(metrics["confusion_matrix"], class_names))
    return metrics, output.root
