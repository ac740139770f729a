"""SavedModel export for TF Serving: bytes in, probabilities and top-k labels out.

    saved_models/<name>/<version>/          TF Serving's layout; integer versions
        saved_model.pb, variables/
        assets/labels.txt                   class names, read by a lookup table in the graph
        assets.extra/tf_serving_warmup_requests
    saved_models/models.config              model_config_list for --model_config_file
    saved_models/batching_parameters.txt    starting values for --batching_parameters_file

Signatures:
    serving_default       image_bytes: tf.string [batch] of encoded JPEG/PNG/GIF/BMP bytes
                          (TF Serving decodes REST {"b64": ...} itself, so the graph gets raw bytes)
    predict_images        images: float32 [batch, height, width, 3], 0-255, any size
    predict_images_uint8  images: uint8 [batch, height, width, 3], any size
each returning probabilities [batch, classes], classes [batch, k] (names) and scores [batch, k].

A version is written under a non-numeric temporary name, verified against the in-memory model,
and only then renamed to its integer name, so a server polling the folder never sees half a model.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np

from tfsft.tfimport import tf
from tfsft import data as data_module
from tfsft import runs
from tfsft.errors import TfsftError

LABELS_FILE = "labels.txt"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
# The run a version came from, so `tfsft convert --saved-model` finds its images and model.
RUN_RECORD = os.path.join("assets.extra", "tfsft_run.txt")
MODELS_CONFIG = "models.config"
BATCHING_PARAMETERS = "batching_parameters.txt"
TOLERANCE = 1e-5
# TF Serving's batching guide: start with threads = CPU cores and a short timeout, then tune
# max_batch_size and batch_timeout_micros against your latency target.
BATCHING_DEFAULTS = """\
# Starting values for tensorflow_model_server --enable_batching --batching_parameters_file=...
# max_batch_size: largest batch the model runs; raise it for throughput on a GPU.
max_batch_size { value: 32 }
# batch_timeout_micros: how long a request may wait for others to share its batch.
batch_timeout_micros { value: 2000 }
# max_enqueued_batches: queue bound before requests are rejected (back-pressure).
max_enqueued_batches { value: 100 }
# num_batch_threads: batches run in parallel; start at the number of CPU cores.
num_batch_threads { value: 4 }
"""


class ExportError(TfsftError):
    """The export cannot be written as asked."""


@dataclass
class ExportResult:
    """Where the version went and how closely it reproduces the in-memory model."""

    path: str
    name: str
    version: int
    max_difference: float
    verified_images: int


class ServingModule(tf.Module):
    """The graph TF Serving runs: decoding, the model, and the label lookup."""

    def __init__(self, model, labels_path: str, image_size: tuple[int, int], top_k: int):
        super().__init__()
        self.model = model
        self.image_size = tuple(image_size)
        self.top_k = top_k
        initializer = tf.lookup.TextFileInitializer(
            labels_path, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
            tf.string, tf.lookup.TextFileIndex.WHOLE_LINE)
        self.labels = tf.lookup.StaticHashTable(initializer, default_value="")

    def _outputs(self, images):
        probabilities = tf.cast(self.model(images, training=False), tf.float32)
        scores, indices = tf.math.top_k(probabilities, k=self.top_k)
        return {"probabilities": probabilities, "classes": self.labels.lookup(tf.cast(indices, tf.int64)),
                "scores": scores}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes):
        size = self.image_size

        def decode(encoded):
            return data_module.resize(data_module.decode_image(encoded), size)

        images = tf.map_fn(decode, image_bytes,
                           fn_output_signature=tf.TensorSpec([size[0], size[1], 3], tf.float32))
        return self._outputs(images)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
    def serve_images(self, images):
        return self._outputs(images)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve_images_uint8(self, images):
        return self._outputs(tf.cast(images, tf.float32))


def export_run(run_dir: str, *, name: Optional[str] = None, version: Optional[int] = None,
               base: str = "saved_models", overwrite: bool = False, top_k: int = 5,
               trust_model: bool = False, log=print) -> ExportResult:
    """Exports a run's ``model.keras`` as ``base/name/version`` for TF Serving, verified.

    Args:
        run_dir: a run written by ``tfsft fit``.
        name: the served model's name (default: the run directory's name).
        version: integer version (default: one more than the highest there).
        base: the folder TF Serving serves (its models.config is updated).
        overwrite: replace an existing version instead of refusing.
        top_k: how many labels and scores ``classes``/``scores`` return (at most the classes).
        trust_model: load a model.keras that holds code (see ``tfsft.model.load``).
    """
    from tfsft import config as config_module
    from tfsft.model import load

    run = runs.RunDir(run_dir)
    class_names = run.read_class_names()
    config = config_module.load(run.path(runs.CONFIG), check_paths=False)
    name = name or os.path.basename(os.path.normpath(run_dir))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ExportError(f"model name {name!r} must be letters, digits, '_', '.' or '-' (it is a "
                          f"URL path in TF Serving). Fix: pass --name")
    model_root = os.path.join(base, name)
    version = _choose_version(model_root, version, overwrite)
    runs.check_writable(model_root, "export folder", "choose another --base or fix its permissions")

    model = load(run.path(runs.MODEL), trust=trust_model)
    encoded, source = sample_images(config, limit=16)
    if source != "validation":
        log(f"note: validation images not found ({source}); verifying on generated images")

    staging = tempfile.mkdtemp(dir=model_root, prefix=f".export-{version}-")
    try:
        write_saved_model(model, class_names, config.image_size, min(top_k, len(class_names)),
                          staging, warmup=encoded[:8], model_name=name)
        runs.atomic_write(os.path.join(staging, RUN_RECORD), os.path.abspath(run_dir).encode())
        difference = verify(staging, model, encoded, config.image_size)
        if difference > TOLERANCE:
            raise ExportError(f"the exported model differs from the trained one by {difference:.2e} "
                              f"(allowed {TOLERANCE:.0e}); nothing was published. This is a bug: "
                              f"please report it with the run's config.yaml")
        target = os.path.join(model_root, str(version))
        _publish(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_models_config(base, name)
    batching = os.path.join(base, BATCHING_PARAMETERS)
    if not os.path.exists(batching):
        runs.atomic_write(batching, BATCHING_DEFAULTS.encode())
    return ExportResult(target, name, version, difference, len(encoded))


def write_saved_model(model, class_names: list[str], image_size: tuple[int, int], top_k: int,
                      path: str, *, warmup: list[bytes], model_name: str) -> None:
    """Writes the SavedModel with its labels asset and warmup requests into ``path``."""
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        labels_path = os.path.join(scratch, LABELS_FILE)
        with open(labels_path, "w", encoding="utf-8") as handle:
            handle.write("".join(f"{name}\n" for name in class_names))
        module = ServingModule(model, labels_path, image_size, top_k)
        signatures = {
            "serving_default": module.serve_bytes.get_concrete_function(),
            "predict_images": module.serve_images.get_concrete_function(),
            "predict_images_uint8": module.serve_images_uint8.get_concrete_function(),
        }
        tf.saved_model.save(module, path, signatures=signatures)
    if warmup:
        write_warmup_requests(os.path.join(path, WARMUP_FILE), model_name, warmup)


def write_warmup_requests(path: str, model_name: str, encoded_images: list[bytes]) -> None:
    """A TFRecord of PredictionLog, one request per image, as TF Serving replays at load time."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for image in encoded_images[:1000]:  # TF Serving reads at most 1000 records.
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default"))
            request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([image], dtype=tf.string))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def verify(path: str, model, encoded_images: list[bytes], image_size: tuple[int, int]) -> float:
    """Reloads the SavedModel and runs every signature on the images; returns the largest
    probability difference from the in-memory Keras model."""
    from tfsft.predict import decode_batch

    loaded = tf.saved_model.load(path)
    resized = decode_batch(encoded_images, image_size)
    # uint8 input rounds the resized pixels, so that signature is compared with the model on the
    # same rounded pixels.
    rounded = np.round(resized)
    expected = np.asarray(model.predict_on_batch(resized), dtype=np.float64)
    expected_rounded = np.asarray(model.predict_on_batch(rounded), dtype=np.float64)
    checks = [
        (loaded.signatures["serving_default"](image_bytes=tf.constant(encoded_images)), expected),
        (loaded.signatures["predict_images"](images=tf.constant(resized)), expected),
        (loaded.signatures["predict_images_uint8"](images=tf.constant(rounded.astype(np.uint8))), expected_rounded),
    ]
    return max(float(np.max(np.abs(out["probabilities"].numpy() - want))) for out, want in checks)


def sample_images(config, limit: int) -> tuple[list[bytes], str]:
    """Up to ``limit`` encoded validation images of the run (for verification and warmup).

    Falls back to generated PNG images when the run's data cannot be read any more.
    """
    try:
        validation = data_module.build(config.data, config.run.seed).val
        if validation.paths is not None:
            images = []
            for path in validation.paths[:limit]:
                with open(path, "rb") as handle:
                    images.append(handle.read())
            return images, "validation"
        dataset = data_module.pipeline(validation, 1, config.image_size, 1, training=False).unbatch()
        return [tf.io.encode_png(tf.cast(image, tf.uint8)).numpy() for image, _ in dataset.take(limit)], "validation"
    except TfsftError as error:
        rng = np.random.default_rng(0)
        images = [tf.io.encode_png(rng.integers(0, 256, size=(40 + 7 * i, 48, 3), dtype=np.uint8)).numpy()
                  for i in range(min(limit, 4))]
        return images, str(error)


def write_models_config(base: str, name: str) -> str:
    """Adds ``name`` to ``base/models.config`` (model_config_list), keeping the entries there.

    Paths are written as ``/models/<name>``, where the tensorflow/serving image expects models;
    for a bare tensorflow_model_server pass --model_base_path, or edit base_path.
    """
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    path = os.path.join(base, MODELS_CONFIG)
    config = model_server_config_pb2.ModelServerConfig()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            try:
                text_format.Parse(handle.read(), config)
            except text_format.ParseError as error:
                raise ExportError(f"cannot read {path} ({error}); the model was exported but the "
                                  f"server config was not updated. Fix: repair or delete {path}") from None
    entries = config.model_config_list.config
    if not any(entry.name == name for entry in entries):
        entry = entries.add()
        entry.name = name
        entry.base_path = f"/models/{name}"
        entry.model_platform = "tensorflow"
    runs.atomic_write(path, text_format.MessageToString(config).encode())
    return path


def _choose_version(model_root: str, version: Optional[int], overwrite: bool) -> int:
    existing = sorted(int(entry) for entry in os.listdir(model_root) if entry.isdigit()) \
        if os.path.isdir(model_root) else []
    if version is None:
        return (existing[-1] + 1) if existing else 1
    if version < 1:
        raise ExportError(f"--version must be a positive integer, got {version}")
    if version in existing and not overwrite:
        raise ExportError(f"{os.path.join(model_root, str(version))} already exists; nothing was "
                          f"changed. Fix: pass --overwrite to replace it, or omit --version to "
                          f"write version {existing[-1] + 1}")
    return version


def _publish(staging: str, target: str) -> None:
    """Renames the verified staging folder to its integer name; an old version is swapped out
    under a non-numeric name first, so the integer path is never half-written."""
    if os.path.exists(target):
        retired = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".retired-")
        os.replace(target, os.path.join(retired, "old"))
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)
