"""Imports TensorFlow once, without the screenful of C++ log lines it prints at start-up.

Every tfsft module that needs TensorFlow or Keras imports this module first. The start-up lines
(oneDNN notices, CUDA probing on machines without a GPU) are written by C++ straight to file
descriptor 2, before any Python logging setting applies, so they are captured while TensorFlow
loads and shown only if the import fails or ``TFSFT_VERBOSE=1`` is set.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings

VERBOSE = os.environ.get("TFSFT_VERBOSE", "") not in ("", "0")


def _import_quietly():
    if VERBOSE:
        import tensorflow

        return tensorflow
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow

            # Device discovery prints its own notices (CUDA probing); do it while captured.
            tensorflow.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode("utf-8", "replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    tensorflow.get_logger().setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    # Keras warns about choices tfsft makes on purpose (e.g. weights at a non-default size).
    warnings.filterwarnings("ignore", category=UserWarning, module=r"keras(\.|$)")
    return tensorflow


tf = _import_quietly()
