"""The classifier: raw images in, class probabilities out, everything in between inside the model.

    image (uint8 or float 0-255, any size) -> resize -> backbone preprocessing -> backbone
      -> global average pool -> dropout -> Dense softmax (float32)

Because resizing and preprocessing live in the model, an exported SavedModel or TFLite file needs
nothing outside it. Random augmentation is not here: it belongs to the training pipeline only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tfsft.tfimport import tf  # noqa: F401  (imports TensorFlow quietly first)
import keras

from tfsft import backbones
from tfsft.errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    from tfsft.config import ModelConfig

BACKBONE_LAYER = "backbone"
HEAD_LAYER = "predictions"


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

    Returns:
        The model (its backbone is the nested model named ``backbone``, its head the Dense layer
        ``predictions``) and a description of the backbone weights it starts from.
    """
    spec = backbones.get_spec(model_config.backbone)
    backbone, weights_used = backbones.build_backbone(spec, model_config.weights, image_size)
    backbone.name = BACKBONE_LAYER

    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    x = keras.layers.Resizing(image_size[0], image_size[1], interpolation="bilinear", name="resize")(inputs)
    if spec.preprocessing != "builtin":
        x = ImagenetPreprocessing(spec.preprocessing, name="preprocess")(x)
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(model_config.dropout, name="dropout")(x)
    # The head stays float32 under a mixed-precision policy so the softmax is computed exactly.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name=HEAD_LAYER)(x)
    return keras.Model(inputs, outputs, name=f"tfsft_{spec.name}"), weights_used


def set_trainable(model: keras.Model, backbone_name: str, trainable: str, batchnorm: str) -> int:
    """Freezes and unfreezes the model for one stage; returns the number of trainable weights.

    Args:
        model: a model from ``build_classifier``.
        backbone_name: its backbone's table name (for the block structure).
        trainable: ``head``, ``all``, ``top_blocks:N`` or ``from_layer:NAME``.
        batchnorm: ``frozen`` keeps every BatchNormalization layer of the backbone untrainable,
            which in Keras 3 also runs it in inference mode (moving statistics fixed);
            ``training=False`` on the call alone does not hold under ``fit``.

    The head is always trainable. The caller must compile afterwards.
    """
    backbone = model.get_layer(BACKBONE_LAYER)
    kind, _, argument = trainable.partition(":")
    if kind == "head":
        chosen: set[int] = set()
    elif kind == "all":
        chosen = {id(layer) for layer in backbone.layers}
    elif kind == "top_blocks":
        blocks = backbones.assign_blocks(backbone, backbones.get_spec(backbone_name))[1:]
        chosen = {id(layer) for _, layers in blocks[-int(argument):] for layer in layers}
    elif kind == "from_layer":
        names = [layer.name for layer in backbone.layers]
        if argument not in names:
            raise ModelError(f"trainable: from_layer:{argument}: no layer named '{argument}' in "
                             f"{backbone_name}; valid names (bottom to top): {', '.join(names)}")
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


def load(path: str, trust: bool = False) -> keras.Model:
    """Loads a ``model.keras``. Keras' safe mode stays on unless ``trust``: a file holding code
    (a Lambda layer) is refused, since loading it would run that code."""
    try:
        return keras.saving.load_model(path, safe_mode=not trust)
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not trust and ("safe_mode" in message or "Lambda" in message):
            raise ModelError(f"{path} contains code (a Lambda layer or similar) that loading would run; "
                             f"tfsft refused it. Fix: if you trust where the file came from, pass "
                             f"--trust-model") from None
        raise ModelError(f"cannot load model {path} ({message[:300]})") from None
