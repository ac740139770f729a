"""Caches for stages that would compute the same thing every epoch.

- **Backbone features** (``stages[].cache_features``): when the backbone is frozen, every epoch of
  a head stage runs the same images through the same backbone to the same pooled features.
  ``FeatureCache`` runs the backbone once per image, keeps the features, and trains a head model
  that shares the classifier's own dropout and Dense layers, so the trained head is already in
  place in the full model for later stages and export.
- **Decoded images** (``data.cache``): ``ImageCache`` keeps the decoded, resized images, so later
  epochs skip reading and decoding files; random augmentation still applies to every batch.

Both store one row per example (``store_rows``: in memory, or memory-mapped under the run
directory) and serve batches (``batches``) shuffled with the same seed and buffer as the image
pipeline, so a cached stage sees the examples in the same order as an uncached one would.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable, Iterable, Optional

import numpy as np

from tfsft.tfimport import tf
import keras

from tfsft import data as data_module
from tfsft.data import Data, Source
from tfsft.model import DROPOUT_LAYER, HEAD_LAYER

# Features larger than this are memory-mapped from the run directory instead of held in memory.
MEMORY_LIMIT_BYTES = 2 * 1024 ** 3
# Rows above this size are looked up from numpy rather than embedded in the tf.data graph.
GRAPH_CONSTANT_LIMIT_BYTES = 512 * 1024 ** 2
FOLDER = "feature_cache"
IMAGE_FOLDER = "image_cache"


def store_rows(batches: Iterable[np.ndarray], count: int, row_shape: tuple[int, ...],
               memmap_path: Optional[str]) -> np.ndarray:
    """Stacks ``count`` rows from ``batches`` into one float32 array: in memory, or a ``.npy``
    file memory-mapped at ``memmap_path``."""
    shape = (count, *row_shape)
    if memmap_path is not None:
        os.makedirs(os.path.dirname(memmap_path), exist_ok=True)
        rows = np.lib.format.open_memmap(memmap_path, mode="w+", dtype=np.float32, shape=shape)
    else:
        rows = np.empty(shape, dtype=np.float32)
    row = 0
    for batch in batches:
        rows[row:row + len(batch)] = batch
        row += len(batch)
    if row != count:
        raise RuntimeError(f"cache: {row} of {count} images could be decoded")
    return rows


def batches(rows: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int, *,
            shuffle_seed: Optional[int]) -> tf.data.Dataset:
    """Batches of (rows, one-hot labels); shuffled each epoch when ``shuffle_seed`` is given, with
    the same element count, seed and buffer as ``data.pipeline``'s shuffle of the file list."""
    indices = tf.data.Dataset.range(len(rows))
    if shuffle_seed is not None:
        indices = indices.shuffle(len(rows), seed=shuffle_seed, reshuffle_each_iteration=True)
    if isinstance(rows, np.memmap) or rows.nbytes > GRAPH_CONSTANT_LIMIT_BYTES:
        def lookup(index):
            row = tf.numpy_function(lambda i: np.asarray(rows[i]), [index], tf.float32)
            row.set_shape(rows.shape[1:])
            return row
    else:
        table = tf.constant(rows)

        def lookup(index):
            return tf.gather(table, index)
    label_table = tf.constant(labels)
    dataset = indices.map(lambda i: (lookup(i), tf.one_hot(tf.gather(label_table, i), num_classes)),
                          num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size)


def feature_extractor(model: keras.Model, image_size: tuple[int, int]) -> Callable:
    """Images in, pooled features out (what the dropout before the head receives): a compiled
    call rather than predict_on_batch, which fails under MultiWorkerMirroredStrategy, traced once
    for any batch size (tracing a ResNet50 costs about a second, as much as a forward pass over a
    hundred images; a trace per shape was a third of a small cached stage)."""
    extractor = keras.Model(model.input, model.get_layer(DROPOUT_LAYER).input)
    return tf.function(lambda images: extractor(images, training=False),
                       input_signature=[tf.TensorSpec((None, *image_size, 3), tf.float32)])


def _describe(rows: np.ndarray, folder: str) -> str:
    where = f"memory-mapped in {folder}" if isinstance(rows, np.memmap) else "in memory"
    return f"{where}, {rows.nbytes / 1e6:.1f} MB"


class ImageCache:
    """Decoded, resized training and validation images (``data.cache: memory | disk``), read
    from the files on first use."""

    def __init__(self, data: Data, image_size: tuple[int, int], batch_size: int, seed: int,
                 augment, mode: str, folder: str, log: Callable[[str], object] = print):
        self.data, self.image_size, self.batch_size, self.seed = data, image_size, batch_size, seed
        self.augment, self.mode, self.folder, self.log = augment, mode, folder, log
        self._rows: dict[str, np.ndarray] = {}

    def train_dataset(self) -> tf.data.Dataset:
        dataset = batches(self._images("train"), self.data.train.labels, len(self.data.class_names),
                          self.batch_size, shuffle_seed=self.seed)
        return data_module.augment_batches(dataset, self.augment, self.seed).prefetch(tf.data.AUTOTUNE)

    def val_dataset(self) -> tf.data.Dataset:
        return self.ordered("val").prefetch(tf.data.AUTOTUNE)

    def ordered(self, split: str) -> tf.data.Dataset:
        """Unshuffled, unaugmented batches of a split."""
        source = self.data.train if split == "train" else self.data.val
        return batches(self._images(split), source.labels, len(self.data.class_names),
                       self.batch_size, shuffle_seed=None)

    def remove(self) -> None:
        self._rows.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _images(self, split: str) -> np.ndarray:
        if split not in self._rows:
            source: Source = self.data.train if split == "train" else self.data.val
            pipeline = data_module.pipeline(source, len(self.data.class_names), self.image_size,
                                            self.batch_size, training=False)
            path = os.path.join(self.folder, f"{split}.npy") if self.mode == "disk" else None
            rows = store_rows((images.numpy() for images, _ in pipeline), len(source),
                              (*self.image_size, 3), path)
            self.log(f"cached {len(rows)} decoded {split} images ({_describe(rows, self.folder)})")
            self._rows[split] = rows
        return self._rows[split]


class FeatureCache:
    """Pooled backbone features of the training and validation images, computed on first use."""

    def __init__(self, model: keras.Model, data: Data, image_size: tuple[int, int], batch_size: int,
                 seed: int, folder: str, log=print,
                 images: Optional[Callable[[str], tf.data.Dataset]] = None):
        self.model, self.data, self.image_size = model, data, image_size
        self.batch_size, self.seed, self.folder, self.log = batch_size, seed, folder, log
        # Unshuffled, unaugmented image batches of a split, when decoded images are cached.
        self.images = images
        self._train: Optional[np.ndarray] = None
        self._val: Optional[np.ndarray] = None
        self._head: Optional[keras.Model] = None
        self._extract: Optional[Callable] = None

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
        return batches(self._features("train"), self.data.train.labels, len(self.data.class_names),
                       self.batch_size, shuffle_seed=self.seed).prefetch(tf.data.AUTOTUNE)

    def val_dataset(self) -> tf.data.Dataset:
        return batches(self._features("val"), self.data.val.labels, len(self.data.class_names),
                       self.batch_size, shuffle_seed=None).prefetch(tf.data.AUTOTUNE)

    def _extractor(self) -> Callable:
        if self._extract is None:
            self._extract = feature_extractor(self.model, self.image_size)
        return self._extract

    def _features(self, split: str) -> np.ndarray:
        cached = self._train if split == "train" else self._val
        if cached is not None:
            return cached
        source = self.data.train if split == "train" else self.data.val
        width = self.model.get_layer(DROPOUT_LAYER).input.shape[-1]
        large = len(source) * width * 4 > MEMORY_LIMIT_BYTES
        pipeline = self.images(split) if self.images is not None else data_module.pipeline(
            source, len(self.data.class_names), self.image_size, self.batch_size, training=False)
        features = store_rows((np.asarray(self._extractor()(images), dtype=np.float32) for images, _ in pipeline),
                              len(source), (width,), os.path.join(self.folder, f"{split}.npy") if large else None)
        self.log(f"cached backbone features of {len(features)} {split} images ({_describe(features, self.folder)})")
        if split == "train":
            self._train = features
        else:
            self._val = features
        return features
