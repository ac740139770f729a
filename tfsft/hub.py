"""TF Hub and Kaggle Models backbones as Keras 3 layers whose variables Keras tracks.

``hub.KerasLayer`` subclasses tf_keras and cannot live in a Keras 3 model; ``keras.layers.TFSMLayer``
wraps a SavedModel's variables as Keras variables (sound) but keeps TensorFlow's ``:0`` in their
names, which breaks every optimizer with slots (``'w:0_momentum' is not a valid scope name``); and a
plain layer around ``hub.load`` tracks no variables, so nothing would be trained or saved.

``HubBackbone`` loads the module with ``tensorflow_hub`` (``hub.resolve``: its cache,
``TFHUB_CACHE_DIR``), wraps each of the module's own ``tf.Variable`` objects in a Keras variable
(the same storage: training the Keras variable trains the module), with a name Keras accepts. The
model then trains with any optimizer, checkpoints and ``model.keras`` hold the module's weights,
and exports (SavedModel, TFLite) trace through the module's restored functions.

``training`` is passed to modules whose ``__call__`` accepts it: True only while the layer is
trainable and the stage asks BatchNorm to train (``batchnorm: train``); ``batchnorm: frozen``
fine-tunes the weights with the module in inference mode, so its BatchNorm statistics stay fixed.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

from tfsft.tfimport import tf
import keras

from tfsft.errors import ModelError, first_line

PREFIX = "hub:"


def is_remote(handle: str) -> bool:
    return "://" in handle


def resolve(handle: str) -> str:
    """The local path of a Hub handle (downloading into the Hub cache when online)."""
    import tensorflow_hub as hub

    if not is_remote(handle) and not os.path.isdir(handle):
        raise ModelError(f"hub:{handle}: no such folder. Fix: point model.backbone at a folder "
                         f"holding a TF2 SavedModel (saved_model.pb), or at a tfhub.dev / Kaggle "
                         f"Models URL")
    try:
        return hub.resolve(handle)
    except Exception as error:  # urllib, HTTP and gfile errors all mean: cannot fetch it
        cache = os.environ.get("TFHUB_CACHE_DIR") or "the default Hub cache (TFHUB_CACHE_DIR unset)"
        reason = first_line(error, 200)
        raise ModelError(f"cannot fetch Hub module {handle} ({reason}); looked in {cache}. Fix: "
                         f"on a machine that is online, download the module (its page has a "
                         f"download link), unpack it here and set model.backbone: hub:/path/to/"
                         f"that/folder; or copy a TFHUB_CACHE_DIR that holds it and set "
                         f"TFHUB_CACHE_DIR to it") from None


def load(handle: str) -> Any:
    """Loads the module behind ``handle``: a new copy, with its own variables, on every call."""
    import tensorflow_hub as hub

    path = resolve(handle)
    if not tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        raise ModelError(f"hub:{handle}: {path} holds no saved_model.pb, so it is not a "
                         f"SavedModel. Fix: point at the module's folder (the one with "
                         f"saved_model.pb and variables/)")
    try:
        return hub.load(path)
    except Exception as error:
        reason = first_line(error)
        raise ModelError(f"cannot load Hub module {handle} ({reason})") from None


def is_tf1_module(module: Any) -> bool:
    """True for the legacy TF1 Hub format, which can be used frozen but not trained in TF2."""
    return bool(getattr(module, "_is_hub_module_v1", False))


def _callable(module: Any):
    """The function the layer calls: the module's ``__call__`` (TF2), else its default signature."""
    if not is_tf1_module(module) and callable(module):
        return module
    if "default" in getattr(module, "signatures", {}):
        return module.signatures["default"]
    raise ModelError("the Hub module is neither callable nor has a 'default' signature, so it is "
                     "not an image feature-vector module. Fix: use a TF2 SavedModel whose "
                     "__call__ takes images")


def _input_spec(module: Any) -> Optional[tf.TensorSpec]:
    function = _callable(module)
    if hasattr(function, "structured_input_signature"):  # a signature (concrete function)
        specs = list(function.structured_input_signature[1].values())
        return specs[0] if specs else None
    concrete = getattr(function, "__call__", None)
    for candidate in getattr(concrete, "concrete_functions", []) or []:
        args = candidate.structured_input_signature[0]
        if args and isinstance(args[0], tf.TensorSpec):
            return args[0]
    return None


def input_size(handle: str) -> Optional[tuple[int, int]]:
    """The (height, width) the module was saved for, or None when it takes any size."""
    spec = _input_spec(load(handle))
    if spec is None or spec.shape.rank != 4 or None in (spec.shape[1], spec.shape[2]):
        return None
    return int(spec.shape[1]), int(spec.shape[2])


def _accepts_training(module: Any) -> bool:
    if is_tf1_module(module):
        return False
    function = getattr(module, "__call__", None)
    import inspect

    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return "training" in parameters


@keras.saving.register_keras_serializable(package="tfsft")
class HubBackbone(keras.layers.Layer):
    """A TF Hub image module (feature vector) as a Keras 3 layer that trains and saves.

    Args:
        handle: a tfhub.dev or Kaggle Models URL, a ``gs://`` path or a local SavedModel folder.
        output_key: for modules that return a dict, the entry to use (default: ``default``).
    """

    def __init__(self, handle: str, output_key: Optional[str] = None, **kwargs):
        # The module's variables and functions are float32: it runs in float32 under any
        # mixed-precision policy (its inputs are cast).
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.handle, self.output_key = handle, output_key
        self._module = load(handle)
        self._function = _callable(self._module)
        self.tf1_format = is_tf1_module(self._module)
        self.accepts_training = _accepts_training(self._module)
        # Set per stage by model.set_trainable: batchnorm: train runs the module in training mode.
        self.call_training = False
        trainable_ids = {id(v) for v in getattr(self._module, "trainable_variables", [])}
        for variable in getattr(self._module, "variables", []):
            self._track_variable(keras.Variable(
                initializer=variable, trainable=id(variable) in trainable_ids, dtype=variable.dtype,
                shape=variable.shape, name=re.sub(r":\d+$", "", variable.name).replace("/", "_")))
        self.built = True

    def call(self, images, training=None):
        if self.accepts_training:
            outputs = self._function(images, training=bool(training and self.trainable and self.call_training))
        elif self.tf1_format:
            input_name = next(iter(self._function.structured_input_signature[1]))
            outputs = self._function(**{input_name: images})
        else:
            outputs = self._function(images)
        if isinstance(outputs, dict):
            key = self.output_key or "default"
            if key not in outputs:
                raise ModelError(f"the Hub module returns {', '.join(sorted(outputs))}, not '{key}'. "
                                 f"Fix: set model.hub.output_key to one of those")
            outputs = outputs[key]
        return outputs

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "handle": self.handle, "output_key": self.output_key}
