"""Checkpoints in the run directory: full ones, and head-only ones on top of a base."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tfsft import runs
from tfsft.tfimport import tf  # noqa: F401
import keras


def small_model():
    inputs = keras.Input((4,))
    features = keras.layers.Dense(3, name="body")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="predictions")(features))


def values(model):
    return [w.numpy().copy() for w in model.weights]


def test_head_only_checkpoints_restore_base_plus_head_and_keep_their_base(tmp_path):
    run = runs.RunDir(str(tmp_path))
    model = small_model()
    head = model.get_layer("predictions").weights
    run.save_checkpoint(model, None, runs.Checkpoint("stage-01-start", 0, 0, 0, has_optimizer=False))
    start = values(model)
    for epoch in (1, 2, 3):
        for variable in head:
            variable.assign(variable + 1.0)
        run.save_checkpoint(model, [], runs.Checkpoint(f"epoch-{epoch:04d}", 0, 0, epoch, base="stage-01-start"),
                            changed=head)
    final = values(model)
    # Two checkpoints are kept; the base they refer to stays, the older epochs go.
    state = json.loads((tmp_path / "state.json").read_text())
    assert [c["name"] for c in state["checkpoints"]] == ["epoch-0002", "epoch-0003"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch-0002", "epoch-0003", "stage-01-start"]
    with np.load(tmp_path / "checkpoints" / "epoch-0003" / runs.WEIGHTS_FILE) as saved:
        assert len(saved.files) == 2, "only the head is written"

    fresh = small_model()
    run.load_weights(run.checkpoints()[-1], fresh)
    for a, b in zip(values(fresh), final):
        np.testing.assert_array_equal(a, b)
    # The body comes from the base, the head from the checkpoint.
    np.testing.assert_array_equal(values(fresh)[0], start[0])
    assert not np.array_equal(values(fresh)[2], start[2])

    # Once no kept checkpoint refers to the base, it is removed.
    run.save_checkpoint(model, None, runs.Checkpoint("stage-01-done", 1, 3, 3, has_optimizer=False))
    run.save_checkpoint(model, [], runs.Checkpoint("epoch-0004", 1, 3, 4))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch-0004", "stage-01-done"]


def test_a_checkpoint_that_does_not_fit_or_lost_its_base_is_refused_untouched(tmp_path):
    run = runs.RunDir(str(tmp_path))
    model = small_model()
    run.save_checkpoint(model, None, runs.Checkpoint("base", 0, 0, 0, has_optimizer=False))
    run.save_checkpoint(model, [], runs.Checkpoint("epoch-0001", 0, 0, 1, base="base"),
                        changed=model.get_layer("predictions").weights)
    inputs = keras.Input((4,))
    other = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Dense(5)(inputs)))  # other shapes
    before = values(other)
    with pytest.raises(ValueError):
        run.load_weights(run.checkpoints()[0], other)
    for a, b in zip(values(other), before):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "checkpoints" / "base" / runs.WEIGHTS_FILE).write_bytes(b"truncated")
    with pytest.raises(ValueError):
        run.load_weights(run.checkpoints()[-1], small_model())
