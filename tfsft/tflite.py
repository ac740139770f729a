"""TFLite conversion for phones, checked with the LiteRT interpreter against the Keras model.

Modes:
    none      float32
    dynamic   dynamic-range quantization (int8 weights, float activations)
    float16   float16 weights
    int8      full integer, calibrated on the run's training images through the training
              pipeline's decode and resize; uint8 image input (raw pixels) and float32 output
              by default, float32 input or uint8 output on request

Conversion goes through ``from_keras_model`` on the model wrapped with a fixed [1, height, width,
3] input, never ``from_concrete_functions`` with a Keras model as ``trackable_obj``, which
silently drops the weights. The class names go into the file as metadata (``tfsft_labels``) and beside it
as ``labels.txt``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from tfsft.tfimport import native_output_captured, tf
from tfsft import data as data_module
from tfsft import runs
from tfsft.errors import ModelError, TfsftError

MODES = ("none", "dynamic", "float16", "int8")
LABELS_METADATA = "tfsft_labels"
REPORT = "tflite_report.json"


class ConversionError(TfsftError):
    """A conversion that cannot be made or fails its check."""


@dataclass
class ModeReport:
    mode: str
    path: str
    size_bytes: int
    size_ratio: float
    accuracy: float
    agreement: float
    max_probability_difference: float
    latency_ms: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def convert(model, mode: str, image_size: tuple[int, int], *,
            representative_images: Optional[Callable[[], Any]] = None, class_names: list[str],
            int8_input: str = "uint8", int8_output: str = "float32") -> bytes:
    """Converts a Keras classifier to a .tflite flatbuffer in one of ``MODES``.

    The model is wrapped with a fixed [1, height, width, 3] input and converted with
    ``from_keras_model`` (a tf.Module SavedModel with a static input shape converted to a graph
    that returns NaN for ResNet50V2 here, so that path is not used).
    """
    import keras

    if mode not in MODES:
        raise ConversionError(f"unknown quantization mode {mode!r}; expected one of {', '.join(MODES)}")
    image = keras.Input(shape=(image_size[0], image_size[1], 3), batch_size=1, name="image")
    wrapper = keras.Model(image, model(image), name="tflite_classifier")
    converter = tf.lite.TFLiteConverter.from_keras_model(wrapper)
    if mode in ("dynamic", "float16", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        if representative_images is None:
            raise ConversionError("int8 needs calibration images")
        converter.representative_dataset = representative_images
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8 if int8_input == "uint8" else tf.float32
        converter.inference_output_type = tf.uint8 if int8_output == "uint8" else tf.float32
    try:
        with native_output_captured((1, 2)):
            flatbuffer = converter.convert()
    except Exception as error:
        text = str(error).strip().splitlines()
        raise ConversionError(f"TFLite conversion ({mode}) failed: {text[0] if text else error}") from None
    return add_labels(flatbuffer, class_names)


def add_labels(flatbuffer: bytes, class_names: list[str]) -> bytes:
    """Stores the class names in the model's metadata list (LiteRT ignores entries it does not know)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer("\n".join(class_names).encode("utf-8"), dtype=np.uint8)
    model.buffers.append(buffer)
    metadata = schema.MetadataT()
    metadata.name = LABELS_METADATA
    metadata.buffer = len(model.buffers) - 1
    model.metadata = (model.metadata or []) + [metadata]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def read_labels(path: str) -> list[str]:
    """Class names from a .tflite file's metadata, else from labels.txt beside it."""
    from tensorflow.lite.tools import flatbuffer_utils

    with open(path, "rb") as handle:
        model = flatbuffer_utils.convert_bytearray_to_object(bytearray(handle.read()))
    for entry in model.metadata or []:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if name == LABELS_METADATA:
            return bytes(model.buffers[entry.buffer].data).decode("utf-8").split("\n")
    beside = os.path.join(os.path.dirname(path), "labels.txt")
    if os.path.isfile(beside):
        with open(beside, encoding="utf-8") as handle:
            return [line.rstrip("\n") for line in handle if line.strip()]
    raise ModelError(f"{path} carries no class names and has no labels.txt beside it")


class LiteModel:
    """A .tflite classifier run through the LiteRT interpreter, one image at a time."""

    def __init__(self, path: str, num_threads: Optional[int] = None):
        from ai_edge_litert.interpreter import Interpreter

        try:
            with native_output_captured((1, 2)):  # LiteRT announces its CPU delegate
                self.interpreter = Interpreter(model_path=path, num_threads=num_threads)
                self.interpreter.allocate_tensors()
        except Exception as error:
            raise ModelError(f"cannot load {path} with LiteRT ({str(error).strip()[:200]})") from None
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.image_size = (int(self.input["shape"][1]), int(self.input["shape"][2]))

    def predict(self, image: np.ndarray) -> np.ndarray:
        """One float 0-255 image [height, width, 3] at the model's size -> probabilities."""
        batch = image.astype(np.float32)[None]
        if np.issubdtype(self.input["dtype"], np.integer):
            scale, zero_point = self.input["quantization"]
            batch = batch / scale + zero_point if scale else batch
            limits = np.iinfo(self.input["dtype"])
            batch = np.clip(np.round(batch), limits.min, limits.max).astype(self.input["dtype"])
        self.interpreter.set_tensor(self.input["index"], batch)
        self.interpreter.invoke()
        result = self.interpreter.get_tensor(self.output["index"])[0]
        if np.issubdtype(self.output["dtype"], np.integer):
            scale, zero_point = self.output["quantization"]
            result = (result.astype(np.float32) - zero_point) * scale
        return result


def load_predictor(path: str):
    """A ``tfsft.predict.Predictor`` for a .tflite file."""
    from tfsft.predict import Predictor, decode_batch

    lite = LiteModel(path)
    class_names = read_labels(path)

    def probabilities(encoded: list[bytes]) -> np.ndarray:
        return np.stack([lite.predict(image) for image in decode_batch(encoded, lite.image_size)])

    return Predictor(class_names, probabilities, "tflite")


def convert_run(run_dir: Optional[str] = None, *, saved_model: Optional[str] = None, modes: list[str],
                output: Optional[str] = None, calibration_images: int = 200, max_check_images: int = 200,
                min_agreement: float = 0.98, int8_input: str = "uint8", int8_output: str = "float32",
                trust_model: bool = False, log=print) -> tuple[list[ModeReport], str, Optional[str]]:
    """Converts a run (or an exported SavedModel) in each mode, checks every file with LiteRT on
    the validation images, and writes ``tflite_report.json``.

    Returns:
        The per-mode reports, the report's path, and a warning line when int8 falls under
        ``min_agreement`` (None otherwise).
    """
    from tfsft import config as config_module
    from tfsft.model import load

    if (run_dir is None) == (saved_model is None):
        raise ConversionError("give either --run-dir or --saved-model")
    if saved_model is not None:
        run_dir = _run_of_saved_model(saved_model)
    run = runs.RunDir(run_dir)
    class_names = run.read_class_names()
    config = config_module.load(run.path(runs.CONFIG), check_paths=False)
    image_size = config.image_size
    model = load(run.path(runs.MODEL), trust=trust_model)
    data = data_module.build(config.data, config.run.seed)

    def representative():
        dataset = data_module.pipeline(data.train, len(class_names), image_size, 1, training=False)
        for images, _ in dataset.take(calibration_images):
            yield [images]

    check = data_module.pipeline(data.val, len(class_names), image_size, 1, training=False).take(max_check_images)
    images = np.concatenate([batch.numpy() for batch, _ in check])
    labels = np.concatenate([np.argmax(y.numpy(), axis=-1) for _, y in check])
    keras_probabilities = np.asarray(model.predict(images, verbose=0, batch_size=32), dtype=np.float64)

    folder = os.path.dirname(output) if output else run.root
    os.makedirs(folder or ".", exist_ok=True)
    runs.atomic_write(os.path.join(folder or ".", "labels.txt"), "".join(f"{n}\n" for n in class_names).encode())
    reports: list[ModeReport] = []
    float_size: Optional[int] = None
    for mode in modes:
        path = output if (output and len(modes) == 1) else os.path.join(
            folder or ".", f"model_{mode if mode != 'none' else 'float32'}.tflite")
        log(f"converting ({mode}) -> {path}")
        flatbuffer = convert(model, mode, image_size, class_names=class_names,
                             representative_images=representative if mode == "int8" else None,
                             int8_input=int8_input, int8_output=int8_output)
        runs.atomic_write(path, flatbuffer)
        if mode == "none":
            float_size = len(flatbuffer)
        reports.append(check_file(path, mode, images, labels, keras_probabilities))
    if float_size is None:  # size ratio against float32 even when it was not asked for
        float_size = len(convert(model, "none", image_size, class_names=class_names))
    for report in reports:
        report.size_ratio = round(report.size_bytes / float_size, 4)

    report_path = run.path(REPORT) if not output else os.path.join(folder or ".", REPORT)
    runs.atomic_write(report_path, (json.dumps({
        "validation_images": int(len(labels)), "keras_accuracy": float(np.mean(np.argmax(keras_probabilities, -1) == labels)),
        "min_agreement": min_agreement, "modes": [r.as_dict() for r in reports]}, indent=2) + "\n").encode())
    return reports, report_path, agreement_warning(reports, min_agreement, len(labels))


def agreement_warning(reports: list[ModeReport], min_agreement: float, images: int) -> Optional[str]:
    """A plain sentence when int8 agrees with Keras on too few images, naming a mode that passed."""
    int8 = next((r for r in reports if r.mode == "int8"), None)
    if int8 is None or int8.agreement >= min_agreement:
        return None
    passing = [r for r in reports if r.mode != "int8" and r.agreement >= min_agreement]
    suggestion = (f"use {passing[-1].mode} instead (agreement {passing[-1].agreement:.3f})" if passing
                  else "try float16 or dynamic, which keep activations in float")
    return (f"int8 agrees with the Keras model on only {int8.agreement:.1%} of {images} validation "
            f"images (required {min_agreement:.0%}); {suggestion}")


def check_file(path: str, mode: str, images: np.ndarray, labels: np.ndarray,
               keras_probabilities: np.ndarray) -> ModeReport:
    """Runs a .tflite file with LiteRT (one thread) on the images and compares with Keras."""
    lite = LiteModel(path, num_threads=1)
    lite.predict(images[0])  # the first call allocates; keep it out of the latency
    started = time.perf_counter()
    probabilities = np.stack([lite.predict(image) for image in images]).astype(np.float64)
    latency = (time.perf_counter() - started) / len(images) * 1000
    if not np.all(np.isfinite(probabilities)):
        raise ConversionError(f"{path} ({mode}) returns non-finite probabilities in LiteRT; the "
                              f"file is not usable. Please report this with the run's config.yaml")
    predicted = np.argmax(probabilities, axis=-1)
    return ModeReport(
        mode=mode, path=path, size_bytes=os.path.getsize(path), size_ratio=1.0,
        accuracy=round(float(np.mean(predicted == labels)), 4),
        agreement=round(float(np.mean(predicted == np.argmax(keras_probabilities, axis=-1))), 4),
        max_probability_difference=float(np.max(np.abs(probabilities - keras_probabilities))),
        latency_ms=round(latency, 3))


def table(reports: list[ModeReport]) -> str:
    """The report as a table a person reads."""
    lines = [f"{'mode':<9}{'size':>10}{'vs float32':>12}{'accuracy':>10}{'agreement':>11}"
             f"{'max diff':>10}{'ms/image':>10}"]
    for r in reports:
        lines.append(f"{r.mode:<9}{r.size_bytes / 1e6:>8.2f}MB{r.size_ratio:>11.2f}x{r.accuracy:>10.3f}"
                     f"{r.agreement:>11.3f}{r.max_probability_difference:>10.1e}{r.latency_ms:>10.2f}")
    return "\n".join(lines)


def _run_of_saved_model(saved_model: str) -> str:
    """The run a SavedModel was exported from (recorded in assets.extra/tfsft_run.txt)."""
    from tfsft.export import RUN_RECORD

    record = os.path.join(saved_model, RUN_RECORD)
    if not os.path.isfile(record):
        raise ConversionError(f"{saved_model} does not record the run it came from ({RUN_RECORD}); "
                              f"use --run-dir with the run directory instead")
    with open(record, encoding="utf-8") as handle:
        return handle.read().strip()
