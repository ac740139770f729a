"""``tfsft predict``: class labels for image files, from a run, a SavedModel or a .tflite file.

Each kind of model is wrapped in a predictor with one method, ``probabilities(encoded images)``,
so the listing of files, the top-k and the output are written once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from tfsft import data as data_module
from tfsft import runs
from tfsft.errors import ModelError, first_line


@dataclass
class Predictor:
    """A loaded model: its class names and a function from encoded images to probabilities."""

    class_names: list[str]
    probabilities: Callable[[list[bytes]], np.ndarray]
    kind: str


def load_predictor(path: str, trust_model: bool = False) -> Predictor:
    """Loads a run directory (model.keras), a SavedModel folder, or a .tflite file.

    A SavedModel is a program: load only ones from sources you trust (tfsft's own exports are).
    """
    if os.path.isfile(path) and path.endswith(".tflite"):
        from tfsft.tflite import load_predictor as load_tflite

        return load_tflite(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, runs.MODEL)):
        return _keras_predictor(path, trust_model)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "saved_model.pb")):
        return _saved_model_predictor(path)
    raise ModelError(f"--model {path}: expected a run directory (with {runs.MODEL}), a SavedModel "
                     f"folder (with saved_model.pb, e.g. saved_models/NAME/1) or a .tflite file")


def _keras_predictor(run_dir: str, trust_model: bool) -> Predictor:
    from tfsft import config as config_module
    from tfsft.model import load

    run = runs.RunDir(run_dir)
    class_names = run.read_class_names()
    image_size = config_module.load(run.path(runs.CONFIG), check_paths=False).image_size
    model = load(run.path(runs.MODEL), trust=trust_model)

    def probabilities(encoded: list[bytes]) -> np.ndarray:
        return np.asarray(model.predict_on_batch(decode_batch(encoded, image_size)))

    return Predictor(class_names, probabilities, "keras")


def _saved_model_predictor(path: str) -> Predictor:
    from tfsft.tfimport import tf

    from tfsft.export import LABELS_FILE

    labels = os.path.join(path, "assets", LABELS_FILE)
    if not os.path.isfile(labels):
        raise ModelError(f"{path} has no assets/{LABELS_FILE}; it was not exported by tfsft export")
    with open(labels, encoding="utf-8") as handle:
        class_names = [line.rstrip("\n") for line in handle if line.strip()]
    serve = tf.saved_model.load(path).signatures["serving_default"]

    def probabilities(encoded: list[bytes]) -> np.ndarray:
        return serve(image_bytes=tf.constant(encoded))["probabilities"].numpy()

    return Predictor(class_names, probabilities, "saved_model")


def decode_batch(encoded: list[bytes], image_size: tuple[int, int]) -> np.ndarray:
    """Encoded images -> float32 [batch, height, width, 3], decoded and resized as in training."""
    from tfsft.tfimport import tf

    return tf.stack([data_module.resize(data_module.decode_image(tf.constant(image)), image_size)
                     for image in encoded]).numpy()


def list_images(paths: list[str], notes: list[str]) -> Iterator[str]:
    """Files as given, and image files found below folders (the walk and checks training uses);
    notes what is passed over."""
    for path in paths:
        skipped: list[tuple[str, str]] = []
        if os.path.isdir(path):
            yield from data_module.images_below(path, skipped)
        elif not os.path.exists(path):
            skipped.append((path, "not found"))
        else:
            reason = data_module.check_image_file(path)
            if reason:
                skipped.append((path, reason))
            else:
                yield path
        notes.extend(f"skipped {skipped_path}: {reason}" for skipped_path, reason in skipped)


def predict_files(predictor: Predictor, paths: list[str], top_k: int, note: Callable[[str], None],
                  batch_size: int = 16) -> Iterator[dict]:
    """Yields {"path", "labels", "scores"} per image, best first; notes skipped files."""
    notes: list[str] = []
    files = list(list_images(paths, notes))
    for line in notes:
        note(line)
    k = min(top_k, len(predictor.class_names))
    for start in range(0, len(files), batch_size):
        batch = files[start:start + batch_size]
        encoded = []
        for path in batch:
            with open(path, "rb") as handle:
                encoded.append(handle.read())
        try:
            probabilities = predictor.probabilities(encoded)
        except Exception:  # one undecodable file must not lose the others: retry one by one.
            probabilities = None
        for index, path in enumerate(batch):
            if probabilities is not None:
                row = probabilities[index]
            else:
                try:
                    row = predictor.probabilities([encoded[index]])[0]
                except Exception as error:
                    note(f"skipped {path}: cannot be decoded ({first_line(error, 200)})")
                    continue
            order = np.argsort(-row)[:k]
            if not np.all(np.isfinite(row)):
                note(f"skipped {path}: the model returned non-finite scores")
                continue
            yield {"path": path, "labels": [predictor.class_names[i] for i in order],
                   "scores": [round(float(row[i]), 6) for i in order]}


def format_line(result: dict) -> str:
    return json.dumps(result, ensure_ascii=False)

