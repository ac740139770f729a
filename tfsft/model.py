"""The classifier: raw images in, class probabilities out, everything in between inside the model.

    image (uint8 or float 0-255, any size) -> resize -> backbone preprocessing -> backbone
      -> global average pool -> dropout -> Dense softmax (float32)

Because resizing and preprocessing live in the model, an exported SavedModel or TFLite file needs
nothing outside it. Random augmentation is not here: it belongs to the training pipeline only.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from tfsft.tfimport import tf  # noqa: F401  (imports TensorFlow quietly first)
import keras

from tfsft import backbones
from tfsft.errors import ModelError, first_line
from tfsft.hub import HubBackbone  # registered for loading model.keras files that hold one

if TYPE_CHECKING:  # pragma: no cover
    from tfsft.config import Config, ModelConfig

BACKBONE_LAYER = "backbone"
HEAD_LAYER = "predictions"
PREPROCESS_LAYER = "preprocess"
DROPOUT_LAYER = "dropout"


@keras.saving.register_keras_serializable(package="tfsft")
class ImagenetPreprocessing(keras.layers.Layer):
    """Maps 0-255 RGB pixels to what a keras.applications backbone's weights expect.

    ``mode`` is a ``keras.applications.imagenet_utils.preprocess_input`` mode: ``caffe`` (BGR,
    ImageNet mean subtracted), ``tf`` (-1 to 1) or ``torch`` (0-1, ImageNet mean and std).
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, images):
        return keras.applications.imagenet_utils.preprocess_input(
            images, data_format="channels_last", mode=self.mode)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def build_classifier(model_config: "ModelConfig", num_classes: int,
                     image_size: tuple[int, int]) -> tuple[keras.Model, str]:
    """Builds the classifier for ``num_classes`` classes at ``image_size`` (height, width).

    The backbone comes from the table, a Hub module or a model tfsft saved before
    (``backbones.parse``); the head is always new.

    Returns:
        The model (its backbone is the layer named ``backbone``, its head the Dense layer
        ``predictions``; its name, ``tfsft_<table name>`` or ``tfsft_hub``, says which block
        structure the backbone has) and a description of the weights the backbone starts from.
    """
    source, value = backbones.parse(model_config.backbone)
    if source == "table":
        spec = backbones.get_spec(value)
        backbone, weights_used = backbones.build_backbone(spec, model_config.weights or "imagenet", image_size)
        backbone.name = BACKBONE_LAYER
        kind = spec.name
        preprocess = (ImagenetPreprocessing(spec.preprocessing, name=PREPROCESS_LAYER)
                      if spec.preprocessing != "builtin" else None)
    elif source == "hub":
        backbone = HubBackbone(value, output_key=model_config.hub.output_key, name=BACKBONE_LAYER)
        low, high = model_config.hub.input_range
        preprocess = keras.layers.Rescaling((high - low) / 255.0, offset=low, name=PREPROCESS_LAYER)
        weights_used, kind = f"hub module {value}", "hub"
    else:
        previous = load(saved_model_path(source, value))
        built_for = _resize_size(previous)
        if built_for != tuple(image_size):
            raise ModelError(f"model.backbone {model_config.backbone}: that backbone was trained at "
                             f"{built_for[0]}x{built_for[1]}, not {image_size[0]}x{image_size[1]}. "
                             f"Fix: set data.image_size: [{built_for[0]}, {built_for[1]}] or leave it out")
        backbone = previous.get_layer(BACKBONE_LAYER)
        preprocess = next((layer for layer in previous.layers if layer.name == PREPROCESS_LAYER), None)
        weights_used, kind = f"backbone of {model_config.backbone}", previous.name.removeprefix("tfsft_")

    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    x = keras.layers.Resizing(image_size[0], image_size[1], interpolation="bilinear", name="resize")(inputs)
    if preprocess is not None:
        x = preprocess(x)
    x = backbone(x)
    if len(x.shape) == 4:  # feature maps; Hub feature-vector modules are pooled already
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(model_config.dropout, name=DROPOUT_LAYER)(x)
    # The head stays float32 under a mixed-precision policy so the softmax is computed exactly.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name=HEAD_LAYER)(x)
    return keras.Model(inputs, outputs, name=f"tfsft_{kind}"), weights_used


def saved_model_path(source: str, value: str) -> str:
    """The model.keras behind ``run:DIR`` or ``keras:PATH``."""
    return os.path.join(value, "model.keras") if source == "run" else value


def _resize_size(model: keras.Model) -> tuple[int, int]:
    resize = model.get_layer("resize")
    return int(resize.height), int(resize.width)


def resolve_backbone(config: "Config") -> None:
    """Fetches a Hub module (or fails) before a run writes anything, and fills ``data.image_size``
    when the config left it to the backbone: the module's own input size (224 when it takes any),
    or the size a reused tfsft model was trained at."""
    source, value = backbones.parse(config.model.backbone)
    if source == "hub":
        from tfsft import hub

        hub.resolve(value)
        if config.data.image_size is None:
            size = hub.input_size(value) or (224, 224)
            config.data.image_size = [size[0], size[1]]
    elif source in ("run", "keras") and config.data.image_size is None:
        size = _resize_size(load(saved_model_path(source, value)))
        config.data.image_size = [size[0], size[1]]


def backbone_spec(model: keras.Model) -> Optional[backbones.BackboneSpec]:
    """The table row of the model's backbone, from the model's name; None for a Hub module."""
    return backbones.BACKBONES.get(model.name.removeprefix("tfsft_"))


def set_trainable(model: keras.Model, trainable: str, batchnorm: str) -> int:
    """Freezes and unfreezes the model for one stage; returns the number of trainable weights.

    Args:
        model: a model from ``build_classifier``.
        trainable: ``head``, ``all``, ``top_blocks:N`` or ``from_layer:NAME``.
        batchnorm: ``frozen`` keeps every BatchNormalization layer of the backbone untrainable,
            which in Keras 3 also runs it in inference mode (moving statistics fixed);
            ``training=False`` on the call alone does not hold under ``fit``.

    A Hub module is one layer to Keras: ``head`` or ``all``, with ``batchnorm`` deciding whether
    the module runs in training mode. The head is always trainable. The caller must compile
    afterwards.
    """
    backbone = model.get_layer(BACKBONE_LAYER)
    kind, _, argument = trainable.partition(":")
    spec = backbone_spec(model)
    if spec is None:
        return _set_trainable_hub(model, backbone, kind, trainable, batchnorm)
    if kind == "head":
        chosen: set[int] = set()
    elif kind == "all":
        chosen = {id(layer) for layer in backbone.layers}
    elif kind == "top_blocks":
        blocks = backbones.assign_blocks(backbone, spec)[1:]
        if int(argument) > len(blocks):
            raise ModelError(f"trainable: top_blocks:{argument}: {spec.name} has {len(blocks)} blocks. "
                             f"Fix: use 1 to {len(blocks)}, or all")
        chosen = {id(layer) for _, layers in blocks[-int(argument):] for layer in layers}
    elif kind == "from_layer":
        names = [layer.name for layer in backbone.layers]
        if argument not in names:
            raise ModelError(f"trainable: from_layer:{argument}: no layer named '{argument}' in "
                             f"{spec.name}; valid names (bottom to top): {', '.join(names)}")
        chosen = {id(layer) for layer in backbone.layers[names.index(argument):]}
    else:  # The config validates the form; this guards direct callers.
        raise ModelError(f"unknown trainable setting {trainable!r}")

    backbone.trainable = bool(chosen)
    for layer in backbone.layers:
        is_batchnorm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = id(layer) in chosen and not (is_batchnorm and batchnorm == "frozen")
    for layer in model.layers:
        if layer is not backbone:
            layer.trainable = True
    return len(model.trainable_weights)


def _set_trainable_hub(model: keras.Model, backbone, kind: str, trainable: str, batchnorm: str) -> int:
    if kind not in ("head", "all"):
        raise ModelError(f"trainable: {trainable}: a hub: backbone is one layer to Keras, without "
                         f"blocks. Fix: use trainable: head or all")
    if kind == "all" and backbone.tf1_format:
        raise ModelError(f"hub:{backbone.handle} is in the TF1 Hub format, which TensorFlow 2 can "
                         f"run but not train. Fix: keep trainable: head for this module, or use "
                         f"its TF2 version (a SavedModel whose __call__ takes images)")
    backbone.trainable = kind == "all"
    backbone.call_training = batchnorm == "train"
    for layer in model.layers:
        if layer is not backbone:
            layer.trainable = True
    return len(model.trainable_weights)


def load(path: str, trust: bool = False) -> keras.Model:
    """Loads a ``model.keras``. Keras' safe mode stays on unless ``trust``: a file holding code
    (a Lambda layer) is refused, since loading it would run that code."""
    try:
        return keras.saving.load_model(path, safe_mode=not trust)
    except Exception as error:
        message = first_line(error, limit=None)
        if not trust and ("safe_mode" in message or "Lambda" in message):
            raise ModelError(f"{path} contains code (a Lambda layer or similar) that loading would run; "
                             f"tfsft refused it. Fix: if you trust where the file came from, pass "
                             f"--trust-model") from None
        raise ModelError(f"cannot load model {path} ({message[:300]})") from None
