"""Hub modules as backbones: trained, saved, reloaded and exported under Keras 3; and reusing the
backbone of a model tfsft trained before."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest

from helpers import run_cli, save_hub_module, small_convnet, tiny_recipe, write_config
from tfsft.config import ModelConfig, StageConfig
from tfsft.errors import ModelError
from tfsft.model import build_classifier, load, set_trainable
from tfsft.predict import load_predictor
from tfsft.training import compile_for_stage

import keras  # noqa: E402  (after tfsft.model, which imports TensorFlow quietly)
from tfsft.tfimport import tf  # noqa: E402


@pytest.fixture(scope="module")
def hub_module(tmp_path_factory) -> str:
    """A small conv net with BatchNorm saved the way TF Hub image modules are (any image size)."""
    return save_hub_module(small_convnet(), str(tmp_path_factory.mktemp("hub") / "module"))


def hub_classifier(handle: str, size=(32, 32), **hub_settings):
    keras.utils.set_random_seed(0)
    model, weights_used = build_classifier(
        ModelConfig(backbone=f"hub:{handle}", hub=hub_settings, dropout=0.0), 3, size)
    return model


def batch(n=8, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 255, (n, size, size, 3)).astype("float32"),
            np.eye(3, dtype="float32")[rng.integers(0, 3, n)])


def by_name(layer):
    return {variable.name: variable.numpy().copy() for variable in layer.weights}


def test_hub_module_gives_the_modules_own_outputs_on_the_declared_input_range(hub_module):
    model = hub_classifier(hub_module, input_range=[0.0, 1.0])
    images, _ = batch(2)
    direct = tf.saved_model.load(hub_module)(tf.constant(images / 255.0), training=False)
    features = keras.Model(model.input, model.get_layer("dropout").input)(images)
    np.testing.assert_allclose(features, direct, atol=1e-5)
    backbone = model.get_layer("backbone")
    # Keras tracks the module's own variables: 4 convs (kernel, bias) and 4 BatchNorms.
    assert len(backbone.weights) == 4 * 2 + 4 * 4
    assert all(":" not in variable.name and "/" not in variable.name for variable in backbone.weights)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_hub_module_fine_tunes_with_every_optimizer_and_frozen_batchnorm_stays_fixed(hub_module, optimizer):
    model = hub_classifier(hub_module)
    set_trainable(model, "all", "frozen")
    compile_for_stage(model, StageConfig(epochs=1, learning_rate=1e-2, trainable="all",
                                         optimizer=optimizer), 1, 3)
    backbone = model.get_layer("backbone")
    before = by_name(backbone)
    model.fit(*batch(), batch_size=8, epochs=1, verbose=0)
    after = by_name(backbone)
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    assert {f"conv{i}_kernel" for i in range(1, 5)} <= changed
    # batchnorm: frozen runs the module in inference mode: its statistics do not move.
    assert not {name for name in changed if "moving" in name}


def test_batchnorm_train_runs_the_module_in_training_mode_and_head_stage_leaves_it_alone(hub_module):
    model = hub_classifier(hub_module)
    backbone = model.get_layer("backbone")
    set_trainable(model, "head", "train")
    compile_for_stage(model, StageConfig(epochs=1, learning_rate=1e-2), 1, 3)
    before = by_name(backbone)
    model.fit(*batch(), batch_size=8, epochs=1, verbose=0)
    assert all(np.array_equal(before[name], value) for name, value in by_name(backbone).items())

    set_trainable(model, "all", "train")
    compile_for_stage(model, StageConfig(epochs=1, learning_rate=1e-2, trainable="all", batchnorm="train"), 1, 3)
    model.fit(*batch(), batch_size=8, epochs=1, verbose=0)
    after = by_name(backbone)
    assert not np.allclose(before["bn1_moving_mean"], after["bn1_moving_mean"])


def test_hub_model_reloads_from_model_keras_with_identical_outputs(hub_module, tmp_path):
    model = hub_classifier(hub_module)
    set_trainable(model, "all", "frozen")
    compile_for_stage(model, StageConfig(epochs=1, learning_rate=1e-2, trainable="all"), 1, 3)
    model.fit(*batch(), batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    reloaded = load(str(tmp_path / "model.keras"))
    images, _ = batch(4, seed=1)
    np.testing.assert_array_equal(reloaded.predict(images, verbose=0), model.predict(images, verbose=0))
    # The reloaded model has its own copy of the module: changing one leaves the other alone.
    reloaded.get_layer("backbone").weights[0].assign(np.zeros(reloaded.get_layer("backbone").weights[0].shape))
    assert np.abs(model.get_layer("backbone").weights[0].numpy()).sum() > 0


def test_blocks_of_a_hub_module_are_refused_with_the_alternatives(hub_module):
    model = hub_classifier(hub_module)
    with pytest.raises(ModelError, match="use trainable: head or all"):
        set_trainable(model, "top_blocks:1", "frozen")


def tf1_hub_module(path: str) -> str:
    """A module in the legacy TF1 Hub format (a TF1 SavedModel with tfhub_module.pb)."""
    with tf.Graph().as_default():
        images = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name="images")
        weights = tf.compat.v1.get_variable("w", [3, 4])
        features = tf.matmul(tf.reduce_mean(images, axis=[1, 2]), weights)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(path)
            signature = tf.compat.v1.saved_model.predict_signature_def({"images": images}, {"default": features})
            builder.add_meta_graph_and_variables(session, [], signature_def_map={"default": signature})
            builder.save()
    open(os.path.join(path, "tfhub_module.pb"), "wb").close()
    return path


def test_tf1_hub_module_runs_frozen_and_training_it_is_one_clear_line(tmp_path, shapes_dir):
    module = tf1_hub_module(str(tmp_path / "tf1"))
    model = hub_classifier(module)
    assert model.predict(batch(2)[0], verbose=0).shape == (2, 3)
    recipe = write_config(tmp_path / "r.yaml", tiny_recipe(shapes_dir, str(tmp_path / "run"), stages="""
        - {name: head, epochs: 1, learning_rate: 1.0e-3, trainable: head}
        - {name: all, epochs: 1, learning_rate: 1.0e-4, trainable: all}""").replace(
        "backbone: mobilenet_v3_small\n  weights: none", f"backbone: hub:{module}"))
    result = run_cli("fit", "--config", recipe)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "stages.1 (all)" in lines[0] and "TF1 Hub format" in lines[0], lines
    assert not os.path.exists(tmp_path / "run" / "history.csv")  # refused before any training


def test_unreachable_hub_handle_is_one_line_naming_the_local_alternatives(tmp_path, shapes_dir):
    recipe = write_config(tmp_path / "r.yaml", tiny_recipe(shapes_dir, str(tmp_path / "run"), stages="""
        - {name: head, epochs: 1, learning_rate: 1.0e-3, trainable: head}""").replace(
        "backbone: mobilenet_v3_small\n  weights: none",
        "backbone: hub:https://tfhub.dev/google/imagenet/resnet_v2_50/feature_vector/5"))
    env_cache = str(tmp_path / "empty-cache")
    result = run_cli("fit", "--config", recipe, env={"TFHUB_CACHE_DIR": env_cache})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "cannot fetch Hub module" in lines[0] and env_cache in lines[0] and "hub:/path/to" in lines[0]
    assert not os.path.exists(tmp_path / "run")  # nothing written


@pytest.mark.slow
def test_fit_on_a_hub_module_exports_and_converts_with_matching_outputs(tmp_path, shapes_dir):
    # A module saved for 40x40 images: the run takes that size from it.
    module = save_hub_module(small_convnet(seed=1), str(tmp_path / "module40"), image_size=40)
    run_dir = tmp_path / "run"
    recipe = write_config(tmp_path / "r.yaml", tiny_recipe(shapes_dir, str(run_dir), stages="""
        - {name: head, epochs: 1, learning_rate: 1.0e-2, trainable: head}
        - {name: all, epochs: 2, learning_rate: 1.0e-3, trainable: all, optimizer: adamw, backbone_lr_multiplier: 0.1}""",
        extra=f"export:\n  name: shapes\n  base: {tmp_path / 'serving'}\n").replace(
        "backbone: mobilenet_v3_small\n  weights: none", f"backbone: hub:{module}").replace(
        "  image_size: [32, 32]\n", ""))
    result = run_cli("fit", "--config", recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "image_size:\n  - 40\n  - 40" in (run_dir / "config.yaml").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["weights_used"] == f"hub module {module}"

    model = load(str(run_dir / "model.keras"))
    original = tf.saved_model.load(module)
    trained = {variable.name: variable.numpy() for variable in model.get_layer("backbone").weights}
    assert not np.allclose(trained["conv1_kernel"], original.variables[0].numpy())  # fine-tuned

    result = run_cli("convert", "--run-dir", str(run_dir), "--quantize", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(pathlib.Path(shapes_dir).rglob("*.jpg"))[:4]
    encoded = [path.read_bytes() for path in files]
    keras_probabilities = load_predictor(str(run_dir)).probabilities(encoded)
    for target in (tmp_path / "serving" / "shapes" / "1", next(run_dir.rglob("*.tflite"))):
        np.testing.assert_allclose(load_predictor(str(target)).probabilities(encoded),
                                   keras_probabilities, atol=1e-5, err_msg=str(target))
