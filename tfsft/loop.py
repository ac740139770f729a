"""The training loop for MultiWorkerMirroredStrategy, where Keras 3's ``model.fit`` fails.

``fit`` under MultiWorkerMirroredStrategy breaks in its wrappers (keras-team/keras #20585: the
symbolic build reduces a distributed batch, then the metrics reduction fails), not in the engine.
This loop keeps everything that works: the compiled model's own ``train_step`` (loss, gradients,
loss scaling, optimizer, metrics) runs on every replica through ``strategy.run``; the callbacks
(history, checkpoints, early stopping, SIGTERM) are driven as ``fit`` drives them; only the
dataset distribution, the epoch loop and validation are written here.

Every worker runs the same number of steps per epoch (the training data repeats, and an epoch is
``steps_per_epoch`` global batches), so no worker waits for a batch another does not have.
Validation runs on each worker over the whole validation set, with the replicated weights, so
every worker sees the same numbers and takes the same early-stopping decisions.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from tfsft.tfimport import tf
import keras

from tfsft.evaluate import compute_metrics, predict


def fit_distributed(model: keras.Model, strategy: tf.distribute.Strategy, train: tf.data.Dataset,
                    val: tf.data.Dataset, *, initial_epoch: int, epochs: int, steps_per_epoch: int,
                    callbacks: Sequence[keras.callbacks.Callback],
                    class_weight: Optional[dict[int, float]] = None) -> None:
    """Trains ``model`` (compiled inside ``strategy.scope()``) like ``model.fit`` would."""
    if class_weight:
        weights = tf.constant([class_weight[index] for index in range(len(class_weight))], tf.float32)
        train = train.map(lambda images, labels: (images, labels, tf.gather(weights, tf.argmax(labels, -1))))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    iterator = iter(strategy.experimental_distribute_dataset(train.repeat().with_options(options)))
    _build(model, train)

    @tf.function
    def train_step(batches):
        strategy.run(model.train_step, args=(next(batches),))

    callback_list = keras.callbacks.CallbackList(list(callbacks), model=model, epochs=epochs,
                                                 steps=steps_per_epoch, verbose=0)
    model.stop_training = False
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        for step in range(steps_per_epoch):
            callback_list.on_train_batch_begin(step)
            train_step(iterator)
            callback_list.on_train_batch_end(step)
            if model.stop_training:
                break
        logs = {name: float(value) for name, value in model.get_metrics_result().items()}
        logs.update(evaluate(model, val))
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end()


def _build(model: keras.Model, train: tf.data.Dataset) -> None:
    """Creates the loss tracker's and metrics' variables outside the replica context, on one
    local batch, as ``fit``'s symbolic build does, without touching a distributed batch."""
    batch = next(iter(train.take(1)))
    images, labels = batch[0], batch[1]
    predictions = model(images, training=False)
    model.compute_metrics(images, labels, predictions, sample_weight=None)
    model.reset_metrics()


def evaluate(model: keras.Model, val: tf.data.Dataset) -> dict[str, Any]:
    """val_loss (the compiled loss, as ``fit`` reports it) and val_accuracy (and
    val_top5_accuracy for more than 5 classes), computed on this worker over the whole
    validation set."""
    true, probabilities = predict(model, val)
    num_classes = probabilities.shape[-1]
    metrics = compute_metrics(true, probabilities, [str(index) for index in range(num_classes)])
    labels = np.eye(num_classes, dtype=np.float32)[true]
    logs = {"val_loss": float(model.loss(labels, probabilities.astype(np.float32))),
            "val_accuracy": metrics["accuracy"]}
    if "top5_accuracy" in metrics:
        logs["val_top5_accuracy"] = metrics["top5_accuracy"]
    return logs
