"""Cached backbone features for frozen stages.

When the backbone is frozen, every epoch of a head stage runs the same images through the same
backbone to the same pooled features. The cache runs the backbone once per image, keeps the
features (in memory, or memory-mapped under the run directory when they are large), and trains
a head model that shares the classifier's own dropout and Dense layers, so the trained head is
already in place in the full model for later stages and export.

The training features are shuffled with the same seed and buffer as the image pipeline, so a
cached stage sees the examples in the same order as the uncached one would.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import numpy as np

from tfsft.tfimport import tf
import keras

from tfsft import data as data_module
from tfsft.data import Data
from tfsft.model import DROPOUT_LAYER, HEAD_LAYER

# Features larger than this are memory-mapped from the run directory instead of held in memory.
MEMORY_LIMIT_BYTES = 2 * 1024 ** 3
FOLDER = "feature_cache"


class FeatureCache:
    """Pooled backbone features of the training and validation images, computed on first use."""

    def __init__(self, model: keras.Model, data: Data, image_size: tuple[int, int], batch_size: int,
                 seed: int, folder: str, log=print):
        self.model, self.data, self.image_size = model, data, image_size
        self.batch_size, self.seed, self.folder, self.log = batch_size, seed, folder, log
        self._train: Optional[np.ndarray] = None
        self._val: Optional[np.ndarray] = None
        self._head: Optional[keras.Model] = None

    def invalidate(self) -> None:
        """Forget the features: the backbone is about to change."""
        self._train = self._val = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def head_model(self) -> keras.Model:
        """Features in, probabilities out, through the classifier's own dropout and Dense layers."""
        if self._head is None:
            width = self.model.get_layer(DROPOUT_LAYER).input.shape[-1]
            features = keras.Input(shape=(width,), name="features")
            outputs = self.model.get_layer(HEAD_LAYER)(self.model.get_layer(DROPOUT_LAYER)(features))
            self._head = keras.Model(features, outputs, name="cached_head")
        return self._head

    def train_dataset(self) -> tf.data.Dataset:
        features = self._features("train")
        num_classes = len(self.data.class_names)
        # Same element count, seed and buffer as data.pipeline's shuffle of the file list.
        indices = tf.data.Dataset.range(len(features)).shuffle(
            len(features), seed=self.seed, reshuffle_each_iteration=True)
        return self._batches(indices, features, self.data.train.labels, num_classes)

    def val_dataset(self) -> tf.data.Dataset:
        features = self._features("val")
        return self._batches(tf.data.Dataset.range(len(features)), features, self.data.val.labels,
                             len(self.data.class_names))

    def _batches(self, indices, features: np.ndarray, labels: np.ndarray, num_classes: int) -> tf.data.Dataset:
        if isinstance(features, np.memmap):
            def lookup(index):
                row = tf.numpy_function(lambda i: np.asarray(features[i]), [index], tf.float32)
                row.set_shape([features.shape[1]])
                return row
        else:
            table = tf.constant(features)

            def lookup(index):
                return tf.gather(table, index)
        label_table = tf.constant(labels)
        dataset = indices.map(lambda i: (lookup(i), tf.one_hot(tf.gather(label_table, i), num_classes)),
                              num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.batch(self.batch_size).prefetch(tf.data.AUTOTUNE)

    def _features(self, split: str) -> np.ndarray:
        cached = self._train if split == "train" else self._val
        if cached is not None:
            return cached
        source = self.data.train if split == "train" else self.data.val
        # The pooled features: what the dropout before the head receives.
        extractor = keras.Model(self.model.input, self.model.get_layer(DROPOUT_LAYER).input)
        # A compiled call rather than predict_on_batch, which fails under MultiWorkerMirroredStrategy.
        extract = tf.function(lambda images: extractor(images, training=False))
        width = extractor.output.shape[-1]
        size = len(source) * width * 4
        if size > MEMORY_LIMIT_BYTES:
            os.makedirs(self.folder, exist_ok=True)
            features = np.lib.format.open_memmap(os.path.join(self.folder, f"{split}.npy"), mode="w+",
                                                 dtype=np.float32, shape=(len(source), width))
        else:
            features = np.empty((len(source), width), dtype=np.float32)
        pipeline = data_module.pipeline(source, len(self.data.class_names), self.image_size,
                                        self.batch_size, training=False)
        row = 0
        for images, _ in pipeline:
            batch = np.asarray(extract(images), dtype=np.float32)
            features[row:row + len(batch)] = batch
            row += len(batch)
        if row != len(source):
            raise RuntimeError(f"feature cache: {row} of {len(source)} {split} images could be decoded")
        self.log(f"cached backbone features of {row} {split} images "
                 f"({'memory-mapped in ' + self.folder if isinstance(features, np.memmap) else 'in memory'}, "
                 f"{size / 1e6:.1f} MB)")
        if split == "train":
            self._train = features
        else:
            self._val = features
        return features
