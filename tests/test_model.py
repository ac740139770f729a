"""The backbone table, the classifier graph and the freeze/unfreeze rules."""

from __future__ import annotations

import numpy as np
import pytest

from tfsft import backbones
from tfsft import data as data_module
from tfsft.config import ModelConfig
from tfsft.errors import ModelError
from tfsft.model import build_classifier, load, set_trainable

import keras  # noqa: E402  (after tfsft.model, which imports TensorFlow quietly)


def classifier(backbone="mobilenet_v3_small", num_classes=3, size=(32, 32), weights="none"):
    keras.utils.set_random_seed(0)
    model, _ = build_classifier(ModelConfig(backbone=backbone, weights=weights, dropout=0.0),
                                num_classes, size)
    return model


@pytest.mark.parametrize("name", list(backbones.BACKBONES))
def test_block_table_matches_the_real_network(name):
    spec = backbones.BACKBONES[name]
    backbone, weights_used = backbones.build_backbone(spec, "none", (32, 32))
    blocks = backbones.assign_blocks(backbone, spec)
    assert blocks[0][0] == "stem"
    assert len(blocks) - 1 == spec.num_blocks, [b for b, _ in blocks]
    # What `tfsft backbones` prints comes from the table: check it against the network.
    assert (blocks[1][0], blocks[-1][0]) == (spec.first_block, spec.last_block)
    assert backbone.count_params() == spec.params
    assert sum(len(layers) for _, layers in blocks) == len(backbone.layers)
    assert weights_used.startswith("none")


@pytest.mark.parametrize("name, top_block, top_layer", [
    ("resnet50", "conv5_block3", "conv5_block3_out"),
    ("resnet50v2", "conv5_block3", "post_relu"),
    ("efficientnet_b0", "block7a", "top_activation"),
    ("mobilenet_v2", "block_16", "out_relu"),
    ("mobilenet_v3_small", "expanded_conv_10", "conv_1_bn"),
])
def test_top_block_is_the_real_last_block_and_keeps_the_layers_after_it(name, top_block, top_layer):
    spec = backbones.BACKBONES[name]
    backbone, _ = backbones.build_backbone(spec, "none", (32, 32))
    block, layers = backbones.assign_blocks(backbone, spec)[-1]
    assert block == top_block
    assert top_layer in [layer.name for layer in layers]


def _offline(*args, **kwargs):
    raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None -- "
                    "[Errno -2] Name or service not known")


def test_imagenet_weights_offline_name_the_cache_file_and_the_alternatives(monkeypatch):
    from keras.src.utils import file_utils

    monkeypatch.setattr(file_utils, "get_file", _offline)
    spec = backbones.BACKBONES["mobilenet_v2"]
    with pytest.raises(ModelError) as caught:
        backbones.build_backbone(spec, "imagenet", (96, 96))
    message = str(caught.value)
    assert "\n" not in message
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5" in message
    assert backbones.keras_cache_dir() in message
    assert "'auto'" in message and "'none'" in message and ".weights.h5" in message

    backbone, used = backbones.build_backbone(spec, "auto", (96, 96))
    assert used.startswith("none (random initialisation: ImageNet weights unavailable")
    assert backbone.count_params() > 0


def test_weights_file_is_loaded_into_the_backbone(tmp_path):
    spec = backbones.BACKBONES["mobilenet_v3_small"]
    keras.utils.set_random_seed(1)
    source, _ = backbones.build_backbone(spec, "none", (32, 32))
    path = str(tmp_path / "backbone.weights.h5")
    source.save_weights(path)
    keras.utils.set_random_seed(2)
    loaded, used = backbones.build_backbone(spec, path, (32, 32))
    assert used == f"file {path}"
    for a, b in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())

    wrong = backbones.BACKBONES["mobilenet_v2"]
    with pytest.raises(ModelError, match="must hold weights saved from the same backbone"):
        backbones.build_backbone(wrong, path, (32, 32))


def test_classifier_outputs_float32_probabilities_and_takes_uint8_of_any_size():
    model = classifier()
    assert model.get_layer("predictions").dtype_policy.compute_dtype == "float32"
    images = np.random.default_rng(0).integers(0, 256, size=(2, 50, 70, 3))
    probabilities = model.predict_on_batch(images.astype("uint8"))
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probabilities, model.predict_on_batch(images.astype("float32")), rtol=1e-6)


def test_model_resizes_raw_images_exactly_as_the_pipeline_does():
    """A raw image fed to the model gives what training saw: the same bilinear resize."""
    model = classifier("resnet50", size=(32, 32))  # caffe preprocessing inside the model
    raw = np.random.default_rng(1).integers(0, 256, size=(1, 45, 61, 3)).astype("uint8")
    from_raw = model.predict_on_batch(raw)
    resized = data_module.resize(raw, (32, 32)).numpy()
    from_pipeline = model.predict_on_batch(resized)
    np.testing.assert_allclose(from_raw, from_pipeline, atol=1e-6)


@pytest.mark.parametrize("backbone", ["resnet50v2", "efficientnet_b0"])
def test_saved_model_keras_reloads_in_safe_mode_with_identical_outputs(tmp_path, backbone):
    model = classifier(backbone)
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = load(path)
    images = np.random.default_rng(2).uniform(0, 255, size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model.predict_on_batch(images), reloaded.predict_on_batch(images), atol=1e-6)


def _trainable_layer_names(model):
    backbone = model.get_layer("backbone")
    return {layer.name for layer in backbone.layers if layer.trainable_weights}


def test_head_stage_trains_only_the_head():
    model = classifier()
    set_trainable(model, "head", "frozen")
    assert _trainable_layer_names(model) == set()
    assert [w.path for w in model.trainable_weights] == ["predictions/kernel", "predictions/bias"]


def test_top_blocks_unfreezes_whole_blocks_but_keeps_batchnorm_frozen():
    model = classifier("resnet50")
    set_trainable(model, "top_blocks:2", "frozen")
    trainable = _trainable_layer_names(model)
    assert trainable, "nothing was unfrozen"
    assert all(name.startswith(("conv5_block3", "conv5_block2")) for name in trainable), trainable
    assert "conv5_block2_1_conv" in trainable and "conv5_block3_3_conv" in trainable
    assert not any(name.endswith("_bn") for name in trainable)
    assert "conv5_block1_1_conv" not in trainable

    set_trainable(model, "top_blocks:2", "train")
    assert "conv5_block3_3_bn" in _trainable_layer_names(model)

    set_trainable(model, "all", "frozen")
    assert "conv1_conv" in _trainable_layer_names(model)
    set_trainable(model, "head", "frozen")
    assert _trainable_layer_names(model) == set()


def test_from_layer_unfreezes_from_that_layer_up_and_names_valid_layers_when_wrong():
    model = classifier("resnet50")
    set_trainable(model, "from_layer:conv5_block1_1_conv", "frozen")
    trainable = _trainable_layer_names(model)
    assert "conv5_block1_1_conv" in trainable and "conv4_block6_3_conv" not in trainable
    with pytest.raises(ModelError, match="no layer named 'conv9'.*conv5_block3_out"):
        set_trainable(model, "from_layer:conv9", "frozen")


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ModelError, match="did you mean 'efficientnet_b0'.*resnet50"):
        backbones.get_spec("efficientnet_bo")


def test_a_model_holding_code_is_refused_unless_trusted(tmp_path):
    inputs = keras.Input(shape=(4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)
    path = str(tmp_path / "model.keras")
    keras.Model(inputs, outputs).save(path)
    with pytest.raises(ModelError) as caught:
        load(path)
    assert "--trust-model" in str(caught.value) and "\n" not in str(caught.value)
    trusted = load(path, trust=True)
    np.testing.assert_allclose(trusted.predict_on_batch(np.ones((1, 4), "float32")), 2.0)
