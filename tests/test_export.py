"""TF Serving export, `tfsft predict`, and TFLite conversion, each compared with the Keras model.

The run these tests export uses resnet50v2 from random initialisation: unlike the MobileNets at
random initialisation, its outputs depend on the input, so comparisons can fail.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import run_cli, tiny_recipe
from tfsft import config as config_module
from tfsft import data as data_module
from tfsft import export, tflite
from tfsft.errors import TfsftError
from tfsft.model import load
from tfsft.tfimport import tf
from tfsft.training import fit


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shapes_dir):
    root = tmp_path_factory.mktemp("export_run")
    recipe = root / "recipe.yaml"
    recipe.write_text(tiny_recipe(shapes_dir, str(root / "run"), """
      - {name: head, epochs: 1, learning_rate: 1.0e-3, trainable: head}""", extra=f"""
    export:
      name: fitted
      base: {root / "fit_exports"}
      tflite: [dynamic]
    """))
    config = config_module.load(str(recipe), ["model.backbone=resnet50v2"])
    fit(config, log=lambda line: None)
    return str(root / "run")


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    base = str(tmp_path_factory.mktemp("saved_models"))
    result = export.export_run(trained_run, name="shapes", base=base, top_k=2, log=lambda line: None)
    return result, base


def keras_reference(run_dir, encoded):
    model = load(os.path.join(run_dir, "model.keras"))
    from tfsft.predict import decode_batch

    return np.asarray(model.predict_on_batch(decode_batch(encoded, (32, 32))))


def validation_images(run_dir, limit=8):
    config = config_module.load(os.path.join(run_dir, "config.yaml"), check_paths=False)
    paths = data_module.build(config.data, config.run.seed).val.paths[:limit]
    return paths, [open(p, "rb").read() for p in paths]


def test_export_writes_tf_serving_layout_verified_against_keras(exported, trained_run):
    result, base = exported
    assert result.version == 1 and result.path == os.path.join(base, "shapes", "1")
    assert result.max_difference <= 1e-5 and result.verified_images == 6
    assert sorted(os.listdir(os.path.join(base, "shapes"))) == ["1"], "no temporary folder left behind"
    assert open(os.path.join(result.path, "assets", "labels.txt")).read().split() == ["circle", "square", "triangle"]
    assert os.path.isfile(os.path.join(base, "batching_parameters.txt"))
    config_text = open(os.path.join(base, "models.config")).read()
    assert 'name: "shapes"' in config_text and 'base_path: "/models/shapes"' in config_text


def test_fit_exports_what_the_config_asks_for(trained_run):
    root = os.path.dirname(trained_run)
    version = os.path.join(root, "fit_exports", "fitted", "1")
    assert os.path.isfile(os.path.join(version, "saved_model.pb"))
    assert 'name: "fitted"' in open(os.path.join(root, "fit_exports", "models.config")).read()
    report = json.load(open(os.path.join(trained_run, "tflite_report.json")))
    assert [m["mode"] for m in report["modes"]] == ["dynamic"]
    assert os.path.isfile(os.path.join(trained_run, "model_dynamic.tflite"))


def test_rest_b64_request_runs_as_tf_serving_runs_it(exported, trained_run):
    """The REST body a client sends; TF Serving base64-decodes {"b64": ...} into a string tensor."""
    result, _ = exported
    paths, encoded = validation_images(trained_run)
    body = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()} for image in encoded]})
    instances = json.loads(body)["instances"]
    tensor = tf.constant([base64.b64decode(instance["b64"]) for instance in instances])
    outputs = tf.saved_model.load(result.path).signatures["serving_default"](image_bytes=tensor)
    expected = keras_reference(trained_run, encoded)
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-5)
    class_names = ["circle", "square", "triangle"]
    top = np.argsort(-expected, axis=1)[:, :2]
    assert outputs["classes"].numpy().astype(str).tolist() == [[class_names[i] for i in row] for row in top]
    np.testing.assert_allclose(outputs["scores"].numpy(), np.take_along_axis(expected, top, 1), atol=1e-5)


def test_grpc_predict_request_and_pixel_signatures(exported, trained_run):
    from tensorflow_serving.apis import predict_pb2

    result, _ = exported
    _, encoded = validation_images(trained_run, 3)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "shapes"
    request.model_spec.signature_name = "serving_default"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(encoded, dtype=tf.string))
    received = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    loaded = tf.saved_model.load(result.path)
    signature = loaded.signatures[received.model_spec.signature_name]
    outputs = signature(image_bytes=tf.constant(tf.make_ndarray(received.inputs["image_bytes"])))
    expected = keras_reference(trained_run, encoded)
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-5)

    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 45, 37, 3))
    as_float = loaded.signatures["predict_images"](images=tf.constant(pixels, tf.float32))
    as_uint8 = loaded.signatures["predict_images_uint8"](images=tf.constant(pixels, tf.uint8))
    model = load(os.path.join(trained_run, "model.keras"))
    np.testing.assert_allclose(as_float["probabilities"].numpy(), model.predict_on_batch(pixels.astype("float32")), atol=1e-5)
    np.testing.assert_allclose(as_uint8["probabilities"].numpy(), as_float["probabilities"].numpy(), atol=1e-6)


def test_warmup_requests_are_prediction_logs_that_run(exported):
    from tensorflow_serving.apis import prediction_log_pb2

    result, _ = exported
    path = os.path.join(result.path, "assets.extra", "tf_serving_warmup_requests")
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
    assert 1 <= len(records) <= 1000
    request = records[0].predict_log.request
    assert request.model_spec.name == "shapes" and request.model_spec.signature_name == "serving_default"
    serve = tf.saved_model.load(result.path).signatures["serving_default"]
    outputs = serve(image_bytes=tf.constant(tf.make_ndarray(request.inputs["image_bytes"])))
    assert outputs["probabilities"].shape == (1, 3)


def test_saved_model_cli_sees_the_signatures(exported):
    result, _ = exported
    shown = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show",
                            "--dir", result.path, "--all"], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    text = shown.stdout
    for expected in ("signature_def['serving_default']", "signature_def['predict_images']",
                     "signature_def['predict_images_uint8']", "dtype: DT_STRING", "outputs['classes']",
                     "outputs['probabilities']", "outputs['scores']"):
        assert expected in text, expected


def test_versions_are_never_overwritten_without_asking(exported, trained_run):
    result, base = exported
    with pytest.raises(TfsftError, match="already exists.*--overwrite"):
        export.export_run(trained_run, name="shapes", base=base, version=1, log=lambda line: None)
    second = export.export_run(trained_run, name="shapes", base=base, log=lambda line: None)
    assert second.version == 2
    third = export.export_run(trained_run, name="shapes", base=base, version=1, overwrite=True,
                              log=lambda line: None)
    assert third.version == 1
    assert sorted(os.listdir(os.path.join(base, "shapes"))) == ["1", "2"]
    assert open(os.path.join(base, "models.config")).read().count('name: "shapes"') == 1


def test_failed_export_leaves_no_integer_folder(trained_run, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        return 1.0  # as if the reloaded model disagreed

    monkeypatch.setattr(export, "verify", broken)
    with pytest.raises(TfsftError, match="differs from the trained one"):
        export.export_run(trained_run, name="broken", base=str(tmp_path), log=lambda line: None)
    assert os.listdir(tmp_path / "broken") == []


@pytest.mark.slow
def test_predict_cli_with_run_saved_model_and_tflite_gives_one_json_line_per_image(exported, trained_run, tmp_path):
    result, _ = exported
    paths, encoded = validation_images(trained_run, 4)
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, (path, image) in enumerate(zip(paths, encoded)):
        (folder / f"{index}{os.path.splitext(path)[1]}").write_bytes(image)
    (folder / "notes.txt").write_text("ignored: not an image extension")
    (folder / "fake.jpg").write_text("<html>")
    lite = tmp_path / "model.tflite"
    converted = run_cli("convert", "--run-dir", trained_run, "--quantize", "none", "--output", str(lite))
    assert converted.returncode == 0, converted.stderr[-2000:]
    expected = keras_reference(trained_run, [(folder / name).read_bytes() for name in sorted(os.listdir(folder))
                                              if name[0].isdigit()])
    for model in (trained_run, result.path, str(lite)):
        predicted = run_cli("predict", "--model", model, str(folder), "--top-k", "2")
        assert predicted.returncode == 0, predicted.stderr[-2000:]
        lines = [json.loads(line) for line in predicted.stdout.splitlines()]
        assert len(lines) == 4, (model, predicted.stdout)
        assert "skipped" in predicted.stderr and "fake.jpg" in predicted.stderr
        for line, row in zip(lines, expected):
            assert len(line["labels"]) == 2
            assert line["labels"][0] == ["circle", "square", "triangle"][int(np.argmax(row))]
            assert line["scores"][0] == pytest.approx(float(np.max(row)), abs=1e-4)


@pytest.mark.slow
def test_tflite_modes_run_in_litert_and_agree_with_keras(trained_run, tmp_path):
    reports, report_path, warning = tflite.convert_run(
        trained_run, modes=["none", "dynamic", "float16", "int8"], calibration_images=20,
        log=lambda line: None)
    by_mode = {r.mode: r for r in reports}
    assert by_mode["none"].max_probability_difference <= 1e-5
    assert by_mode["none"].agreement == 1.0
    assert by_mode["float16"].agreement >= 0.8 and by_mode["dynamic"].agreement >= 0.8
    assert by_mode["int8"].agreement >= 0.5
    assert by_mode["float16"].size_ratio < 0.6 and by_mode["int8"].size_ratio < 0.35
    report = json.load(open(report_path))
    assert [m["mode"] for m in report["modes"]] == ["none", "dynamic", "float16", "int8"]
    for r in reports:
        lite = tflite.LiteModel(r.path)
        assert tflite.read_labels(r.path) == ["circle", "square", "triangle"]
        assert lite.predict(np.zeros((32, 32, 3), np.float32)).shape == (3,)
    assert os.path.isfile(os.path.join(trained_run, "labels.txt"))
    if by_mode["int8"].agreement < 0.98:
        assert warning and "int8 agrees" in warning


def test_int8_with_float_input_and_quantized_output(trained_run, tmp_path):
    model = load(os.path.join(trained_run, "model.keras"))
    config = config_module.load(os.path.join(trained_run, "config.yaml"), check_paths=False)
    built = data_module.build(config.data, config.run.seed)
    images = np.concatenate([x.numpy() for x, _ in data_module.pipeline(built.train, 3, (32, 32), 8, training=False)])

    def representative():
        for image in images[:16]:
            yield [image[None]]

    path = tmp_path / "io.tflite"
    path.write_bytes(tflite.convert(model, "int8", (32, 32), representative_images=representative,
                                    class_names=["circle", "square", "triangle"],
                                    int8_input="float32", int8_output="uint8"))
    lite = tflite.LiteModel(str(path))
    assert lite.input["dtype"] == np.float32 and lite.output["dtype"] == np.uint8
    expected = model.predict_on_batch(images[:8])
    got = np.stack([lite.predict(image) for image in images[:8]])
    assert np.max(np.abs(got - expected)) < 0.05, "dequantized uint8 output far from the Keras probabilities"


def test_int8_gate_names_a_mode_that_passed_and_strict_exits_1(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from tfsft.cli import main

    def report(mode, agreement):
        return tflite.ModeReport(mode, f"{mode}.tflite", 100, 1.0, 0.9, agreement, 0.01, 1.0)

    reports = [report("none", 1.0), report("float16", 0.995), report("int8", 0.9)]
    warning = tflite.agreement_warning(reports, 0.98, 200)
    assert warning == ("int8 agrees with the Keras model on only 90.0% of 200 validation images "
                       "(required 98%); use float16 instead (agreement 0.995)")
    assert tflite.agreement_warning(reports, 0.85, 200) is None
    assert "try float16 or dynamic" in tflite.agreement_warning([report("int8", 0.5)], 0.98, 10)

    monkeypatch.setattr(tflite, "convert_run", lambda *a, **k: (reports, "r.json", warning))
    lenient = CliRunner().invoke(main, ["convert", "--run-dir", str(tmp_path), "--quantize", "int8"])
    assert lenient.exit_code == 0 and "use float16 instead" in lenient.output
    strict = CliRunner().invoke(main, ["convert", "--run-dir", str(tmp_path), "--quantize", "int8", "--strict"])
    assert strict.exit_code == 1


def test_unwritable_export_folder_stops_fit_before_training(tmp_path, shapes_dir):
    (tmp_path / "a_file").write_text("x")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe(shapes_dir, str(tmp_path / "run"), extra=f"""
    export: {{name: shapes, base: {tmp_path / "a_file" / "models"}}}
    """))
    config = config_module.load(str(recipe))
    with pytest.raises(TfsftError, match="cannot write to"):
        fit(config, log=lambda line: None)
    assert not (tmp_path / "run" / "checkpoints").exists(), "training started"
