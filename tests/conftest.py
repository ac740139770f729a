"""Shared fixtures: small image folders made by the tests.

Every test runs offline: KERAS_HOME points at an empty folder (set here, before any test module
imports Keras, which reads it once) so no cached ImageNet weights are ever found.
"""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_HOME"] = tempfile.mkdtemp(prefix="tfsft-test-keras-home-")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> str:
    """Three classes of 12 small shape images each, in mixed formats and nested folders."""
    from tfsft.sample_data import make_shapes

    root = tmp_path_factory.mktemp("shapes") / "shapes"
    make_shapes(str(root), images_per_class=12, image_size=40, num_classes=3, seed=1)
    return str(root)
