"""Helpers shared by the tests: tiny recipes and the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def write_config(path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def tiny_recipe(train: str, run_dir: str, stages: str | None = None, extra: str = "") -> str:
    """A recipe that trains in seconds: mobilenet_v3_small at 32 px, random init, float32.

    ``stages`` is YAML list items (``- {...}``), one per line, indented any way.
    """
    stages = stages or """
      - {name: head, epochs: 1, learning_rate: 1.0e-3, trainable: head}
      - {name: finetune, epochs: 1, learning_rate: 1.0e-4, trainable: top_blocks:1}"""
    stage_lines = "\n".join("  " + line for line in textwrap.dedent(stages).strip().splitlines())
    return (f"data:\n  train: {train}\n  image_size: [32, 32]\n  batch_size: 8\n"
            f"model:\n  backbone: mobilenet_v3_small\n  weights: none\n"
            f"stages:\n{stage_lines}\n"
            f"run:\n  dir: {run_dir}\n  seed: 0\n"
            # float32 whatever the CPU: the tests compare weights and outputs closely.
            f"distribute:\n  precision: float32\n") + textwrap.dedent(extra)


def run_cli(*args: str, cwd=None, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    """Runs the real ``tfsft`` command in a subprocess (``env``: variables to add)."""
    return subprocess.run([sys.executable, "-m", "tfsft", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def save_hub_module(net, path: str, image_size=None) -> str:
    """Saves a Keras model as a reusable TF2 SavedModel, the way TF Hub image modules are made:
    ``__call__(images, training)`` traced for both training values, plus ``variables``,
    ``trainable_variables`` and ``regularization_losses``. Serves as a local Hub module."""
    from tfsft.tfimport import tf

    side = None if image_size is None else image_size
    spec = tf.TensorSpec([None, side, side, 3], tf.float32)
    module = tf.train.Checkpoint()
    module.net = net

    @tf.function
    def call(images, training=False):
        return net(images, training=training)

    call.get_concrete_function(spec, training=True)
    call.get_concrete_function(spec, training=False)
    module.__call__ = call
    module.variables = [variable.value for variable in net.variables]
    module.trainable_variables = [variable.value for variable in net.trainable_variables]
    module.regularization_losses = []
    tf.saved_model.save(module, path)
    return path


def small_convnet(name: str = "small_convnet", seed: int = 0):
    """A small conv net with BatchNorm: input [0, 1] images, output pooled features."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 3))
    x = inputs
    for index, width in enumerate((16, 32, 64, 64)):
        x = keras.layers.Conv2D(width, 3, strides=1 if index == 0 else 2, padding="same",
                                name=f"conv{index + 1}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{index + 1}")(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x, name=name)
