"""Reusing what was learned: the backbone of a tfsft run or model.keras file under a new head, a
discriminative learning rate, and a real transfer test against random initialisation."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from helpers import run_cli, save_hub_module, small_convnet, tiny_recipe, write_config
from tfsft import config as config_module
from tfsft.config import ModelConfig, StageConfig
from tfsft.errors import ConfigError, ModelError
from tfsft.model import build_classifier, load, set_trainable
from tfsft.sample_data import make_shapes
from tfsft.training import fit, make_optimizer

import keras  # noqa: E402  (after tfsft.model, which imports TensorFlow quietly)
from tfsft.tfimport import tf  # noqa: E402


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shapes_dir) -> str:
    folder = tmp_path_factory.mktemp("reuse")
    recipe = write_config(folder / "r.yaml", tiny_recipe(shapes_dir, str(folder / "run"), stages="""
        - {name: head, epochs: 1, learning_rate: 1.0e-3, trainable: head}"""))
    fit(config_module.load(recipe), log=lambda line: None)
    return str(folder / "run")


@pytest.mark.parametrize("source", ["run", "keras"])
def test_reused_backbone_keeps_its_weights_size_and_blocks_under_a_new_head(tmp_path, trained_run, shapes_dir, source):
    backbone = f"run:{trained_run}" if source == "run" else f"keras:{os.path.join(trained_run, 'model.keras')}"
    config = config_module.load(write_config(tmp_path / "c.yaml", f"""
        data: {{train: {shapes_dir}}}
        model: {{backbone: "{backbone}"}}
        stages: [{{epochs: 1, learning_rate: 1.0e-4, trainable: "top_blocks:1"}}]
        """))
    from tfsft.model import resolve_backbone

    resolve_backbone(config)
    assert config.image_size == (32, 32)  # the size the first run was trained at
    previous = load(os.path.join(trained_run, "model.keras"))
    model, weights_used = build_classifier(config.model, 2, config.image_size)
    assert weights_used == f"backbone of {backbone}"
    assert model.name == previous.name == "tfsft_mobilenet_v3_small"  # keeps its block structure
    assert model.get_layer("predictions").units == 2
    for new, old in zip(model.get_layer("backbone").weights, previous.get_layer("backbone").weights):
        np.testing.assert_array_equal(new.numpy(), old.numpy())
    assert set_trainable(model, "top_blocks:1", "frozen") > 2
    with pytest.raises(ModelError, match="has 11 blocks"):
        set_trainable(model, "top_blocks:12", "frozen")
    with pytest.raises(ModelError, match=r"trained at 32x32.*image_size: \[32, 32\]"):
        build_classifier(config.model, 2, (48, 48))


def test_reuse_paths_are_checked_before_tensorflow_starts(tmp_path, shapes_dir):
    for backbone, expected in (("run:nowhere", "no finished tfsft run there"),
                               ("keras:model.h5", "takes a .keras file"),
                               ("keras:missing.keras", "file not found"),
                               ("hub:missing_folder", "no such folder")):
        path = write_config(tmp_path / "c.yaml", f"""
            data: {{train: {shapes_dir}}}
            model: {{backbone: "{backbone}"}}
            stages: [{{epochs: 1, learning_rate: 1.0e-3}}]
            """)
        with pytest.raises(ConfigError, match=expected):
            config_module.load(path)
    path = write_config(tmp_path / "c.yaml", f"""
        data: {{train: {shapes_dir}}}
        model: {{backbone: "hub:{tmp_path}", weights: imagenet}}
        stages: [{{epochs: 1, learning_rate: 1.0e-3}},
                 {{epochs: 1, learning_rate: 1.0e-3, trainable: all, backbone_lr_multiplier: 0.1}},
                 {{epochs: 1, learning_rate: 1.0e-3, backbone_lr_multiplier: 0.1}}]
        """)
    with pytest.raises(ConfigError) as error:
        config_module.load(path)
    assert [line.split(": ")[2] for line in error.value.lines] == ["model.weights", "stages.2.backbone_lr_multiplier"]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_backbone_lr_multiplier_scales_the_backbones_steps_only(optimizer):
    keras.utils.set_random_seed(0)
    model, _ = build_classifier(ModelConfig(backbone="resnet50v2", weights="none"), 3, (32, 32))
    set_trainable(model, "all", "frozen")
    backbone_ids = {id(v) for v in model.get_layer("backbone").trainable_variables}
    stage = StageConfig(epochs=1, learning_rate=0.01, trainable="all", optimizer=optimizer,
                        momentum=0.0, backbone_lr_multiplier=0.1)
    optimizer_ = make_optimizer(stage, 1, model.get_layer("backbone").trainable_variables)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32"))
    labels = np.eye(3, dtype="float32")[[0, 1, 2, 0]]
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.categorical_crossentropy(labels, model(images, training=True)))
    variables = model.trainable_variables
    gradients = tape.gradient(loss, variables)
    before = [v.numpy().copy() for v in variables]
    optimizer_.apply(gradients, variables)
    steps = [before[i] - v.numpy() for i, v in enumerate(variables)]
    if optimizer == "sgd":  # exactly lr x multiplier x gradient for the backbone, lr x gradient for the head
        for v, step, gradient in zip(variables, steps, gradients):
            expected = 0.01 * (0.1 if id(v) in backbone_ids else 1.0) * gradient.numpy()
            # float32 subtraction of a small step from a weight: compare within 1% of the step.
            np.testing.assert_allclose(step, expected, atol=0.01 * np.abs(expected).max(), err_msg=v.path)
    else:  # Adam's first step moves each weight by about its rate, whatever the gradient's scale
        backbone_step = max(np.abs(s).max() for v, s in zip(variables, steps) if id(v) in backbone_ids)
        head_step = max(np.abs(s).max() for v, s in zip(variables, steps) if id(v) not in backbone_ids)
        assert 0.0009 < backbone_step < 0.00105 and 0.009 < head_step < 0.0105, (backbone_step, head_step)


@pytest.mark.slow
def test_pretrained_backbones_beat_random_init_on_a_new_task_with_few_labels(tmp_path):
    """Pretrain a small backbone on one task (circles, squares, triangles), reuse it as a tfsft run
    and as a local Hub module on another (stars, crosses, rings; 10 labelled images a class), and
    compare with the same architecture from random initialisation at the same budget."""
    make_shapes(str(tmp_path / "A"), images_per_class=400, image_size=32, seed=1,
                shapes=["circle", "square", "triangle"])
    make_shapes(str(tmp_path / "B"), images_per_class=70, image_size=32, seed=2,
                shapes=["star", "cross", "ring"])
    random_module = save_hub_module(small_convnet(seed=3), str(tmp_path / "random_module"))

    def fit_cli(name, backbone, data, stages, augment=""):
        recipe = write_config(tmp_path / f"{name}.yaml", f"""
            data:
              train: {tmp_path / data}
              image_size: [32, 32]
              batch_size: 16
              val_split: {0.86 if data == 'B' else 0.2}
            {augment}model:
              backbone: "{backbone}"
            stages:
            {stages}
            run:
              dir: {tmp_path / name}
              seed: 0
            distribute:
              precision: float32
            """)
        result = run_cli("fit", "--config", recipe)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((tmp_path / name / "metrics.json").read_text())["val_accuracy"]

    pretrain = fit_cli("pretrain", f"hub:{random_module}", "A", augment="  augment: {flip: horizontal_and_vertical, rotation: 0.25}\n            ",
                       stages="  - {epochs: 30, learning_rate: 3.0e-3, trainable: all, batchnorm: train, schedule: cosine}")
    assert pretrain > 0.6, pretrain

    pretrained = load(str(tmp_path / "pretrain" / "model.keras")).get_layer("backbone")
    images = keras.Input((None, None, 3))
    pretrained_module = save_hub_module(keras.Model(images, pretrained(images)), str(tmp_path / "pretrained_module"))

    budget = """  - {name: head, epochs: 20, learning_rate: 1.0e-2, trainable: head}
              - {name: finetune, epochs: 4, learning_rate: 1.0e-3, trainable: all, backbone_lr_multiplier: 0.3}"""
    accuracy = {
        "run": fit_cli("from_run", f"run:{tmp_path / 'pretrain'}", "B", budget),
        "hub": fit_cli("from_hub", f"hub:{pretrained_module}", "B", budget),
        "random": fit_cli("from_random", f"hub:{random_module}", "B", budget),
    }
    print(accuracy, file=sys.stderr)
    # Measured: run 0.544, hub 0.467, random 0.311 (chance 0.333); the margin leaves room for
    # run-to-run drift of the CPU kernels (about 0.03).
    assert accuracy["run"] >= accuracy["random"] + 0.1, accuracy
    assert accuracy["hub"] >= accuracy["random"] + 0.1, accuracy
