"""The backbones tfsft knows, as one explicit table, and the one front door that builds them.

Each row says how to build the network (a ``keras.applications`` constructor), what preprocessing
its ImageNet weights expect, its default and minimum image size, and how its layers group into
blocks (a regular expression over layer names), so ``trainable: top_blocks:N`` unfreezes real
blocks (ResNet ``conv5_block3``, EfficientNet ``block7a``, MobileNetV2 ``block_16``) rather than a
count of layers.

The table is plain data and imports nothing heavy: the config is checked against it before
TensorFlow is imported.

``model.backbone`` is a table name, or one of three other sources (``parse``): ``hub:HANDLE`` (a TF
Hub / Kaggle Models module, ``tfsft.hub``), ``run:DIR`` (the backbone of a model tfsft trained
before) or ``keras:PATH.keras`` (the backbone of a saved tfsft model).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tfsft.errors import ModelError, first_line

if TYPE_CHECKING:  # pragma: no cover
    import keras


@dataclass(frozen=True)
class BackboneSpec:
    """One row of the table.

    Attributes:
        name: the name used in configs (``model.backbone``).
        constructor: attribute of ``keras.applications`` that builds it.
        preprocessing: ``caffe``, ``tf`` or ``torch`` (``keras.applications.imagenet_utils``
            modes, applied by tfsft inside the model), or ``builtin`` when the network rescales
            0-255 inputs itself.
        default_size: image size the ImageNet weights were trained at.
        min_size: smallest image side the architecture accepts.
        block_pattern: regular expression whose first group, matched at the start of a layer
            name, names the block the layer belongs to. Layers that match nothing belong to the
            block before them (or to the stem, before the first block).
        num_blocks: number of blocks the pattern finds; checked against the real network by
            the tests, and used to validate ``top_blocks:N`` before TensorFlow is imported.
        weights_file: file name Keras caches the ImageNet no-top weights under
            (``$KERAS_HOME/models/``, default ``~/.keras/models/``).
        params: parameters without the classification top.
        first_block, last_block: the bottom and top block names (``tfsft backbones``).
        The last three are checked against the real networks by the tests.
    """

    name: str
    constructor: str
    preprocessing: str
    default_size: int
    min_size: int
    block_pattern: str
    num_blocks: int
    weights_file: str
    params: int
    first_block: str
    last_block: str

    def weights_file_for(self, image_size: tuple[int, int]) -> str:
        """The cached weights file name, which for MobileNetV2 depends on the image size."""
        if "{rows}" in self.weights_file:
            rows = image_size[0] if image_size[0] in (96, 128, 160, 192, 224) else 224
            return self.weights_file.format(rows=rows)
        return self.weights_file


_RESNET_BLOCKS = r"(conv\d_block\d+)_"
_EFFICIENTNET_BLOCKS = r"(block\d+[a-z])_"
_MOBILENET_V3_BLOCKS = r"(expanded_conv(?:_\d+)?)_"

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("resnet50", "ResNet50", "caffe", 224, 32, _RESNET_BLOCKS, 16,
                     "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                     23587712, "conv2_block1", "conv5_block3"),
        BackboneSpec("resnet50v2", "ResNet50V2", "tf", 224, 32, _RESNET_BLOCKS, 16,
                     "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                     23564800, "conv2_block1", "conv5_block3"),
        BackboneSpec("resnet101", "ResNet101", "caffe", 224, 32, _RESNET_BLOCKS, 33,
                     "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
                     42658176, "conv2_block1", "conv5_block3"),
        BackboneSpec("mobilenet_v2", "MobileNetV2", "tf", 224, 32, r"(expanded_conv|block_\d+)_", 17,
                     "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5",
                     2257984, "expanded_conv", "block_16"),
        BackboneSpec("mobilenet_v3_small", "MobileNetV3Small", "builtin", 224, 32,
                     _MOBILENET_V3_BLOCKS, 11,
                     "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
                     939120, "expanded_conv", "expanded_conv_10"),
        BackboneSpec("mobilenet_v3_large", "MobileNetV3Large", "builtin", 224, 32,
                     _MOBILENET_V3_BLOCKS, 15,
                     "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
                     2996352, "expanded_conv", "expanded_conv_14"),
        BackboneSpec("efficientnet_b0", "EfficientNetB0", "builtin", 224, 32, _EFFICIENTNET_BLOCKS, 16,
                     "efficientnetb0_notop.h5",
                     4049571, "block1a", "block7a"),
        BackboneSpec("efficientnetv2_b0", "EfficientNetV2B0", "builtin", 224, 32,
                     _EFFICIENTNET_BLOCKS, 21, "efficientnetv2-b0_notop.h5",
                     5919312, "block1a", "block6h"),
    ]
}


SOURCES = ("hub", "run", "keras")


def parse(backbone: str) -> tuple[str, str]:
    """Splits ``model.backbone`` into (source, value): ("table", "resnet50"), ("hub", URL),
    ("run", DIR), ("keras", PATH)."""
    source, separator, value = backbone.partition(":")
    if separator and source in SOURCES:
        return source, value
    return "table", backbone


def get_spec(name: str) -> BackboneSpec:
    """Returns the table row for ``name``, or raises an error listing the valid names."""
    if name in BACKBONES:
        return BACKBONES[name]
    raise ModelError(unknown_backbone_message(name))


def unknown_backbone_message(name: str) -> str:
    close = difflib.get_close_matches(name, BACKBONES, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (f"unknown backbone '{name}'; {hint}valid names: {', '.join(BACKBONES)}, or "
            f"hub:HANDLE, run:DIR, keras:PATH.keras")


def keras_cache_dir() -> str:
    """Where Keras caches downloaded weights (``$KERAS_HOME/models``, default ``~/.keras/models``)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models")


def build_backbone(
    spec: BackboneSpec, weights: str, image_size: tuple[int, int]
) -> tuple["keras.Model", str]:
    """Builds the backbone without its classification top.

    Args:
        spec: the table row.
        weights: ``imagenet``, ``none``, ``auto`` or a path to a ``.weights.h5``/``.h5`` file
            holding weights for this exact backbone.
        image_size: (height, width) the backbone is built for.

    Returns:
        The backbone and a short description of the weights it carries, for metrics.json.
    """
    import keras

    constructor = getattr(keras.applications, spec.constructor)
    input_shape = (image_size[0], image_size[1], 3)

    def build(keras_weights):
        return constructor(include_top=False, weights=keras_weights, input_shape=input_shape)

    if weights == "none":
        return build(None), "none (random initialisation)"
    if weights in ("imagenet", "auto"):
        try:
            return build("imagenet"), "imagenet"
        except Exception as error:  # Keras raises a bare Exception for a failed download.
            cache_file = os.path.join(keras_cache_dir(), spec.weights_file_for(image_size))
            reason = first_line(error)
            if weights == "auto":
                return build(None), f"none (random initialisation: ImageNet weights unavailable: {reason})"
            raise ModelError(
                f"cannot load ImageNet weights for '{spec.name}' ({reason}); Keras looks for "
                f"{cache_file} and downloads it when online. Fix: copy that file there, or set "
                f"model.weights to a .weights.h5 path, to 'auto' (random init when offline) or to 'none'"
            ) from None
    backbone = build(None)
    try:
        backbone.load_weights(weights)
    except Exception as error:
        raise ModelError(
            f"cannot load weights file {weights} into backbone '{spec.name}' ({first_line(error)}); "
            f"the file must hold weights saved from the same backbone (no top), e.g. with "
            f"backbone.save_weights('x.weights.h5')"
        ) from None
    return backbone, f"file {weights}"


def assign_blocks(backbone: "keras.Model", spec: BackboneSpec) -> list[tuple[str, list]]:
    """Groups the backbone's layers into (block name, layers), bottom to top.

    Layers before the first matching layer form the block ``stem``; a layer whose name matches
    nothing belongs to the block before it (so ``post_bn`` after ResNet50V2's last block, or
    EfficientNet's ``top_conv``, travel with the top block).
    """
    pattern = re.compile(spec.block_pattern)
    blocks: dict[str, list] = {"stem": []}
    current = "stem"
    for layer in backbone.layers:
        match = pattern.match(layer.name)
        if match:
            current = match.group(1)
        blocks.setdefault(current, []).append(layer)
    return list(blocks.items())
