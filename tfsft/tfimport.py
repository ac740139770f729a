"""Imports TensorFlow once, without the screenful of C++ log lines it prints at start-up.

Every tfsft module that needs TensorFlow or Keras imports this module first. The start-up lines
(oneDNN notices, CUDA probing on machines without a GPU) are written by C++ straight to file
descriptor 2, before any Python logging setting applies, so they are captured while TensorFlow
loads and shown only if the import fails or ``TFSFT_VERBOSE=1`` is set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings

VERBOSE = os.environ.get("TFSFT_VERBOSE", "") not in ("", "0")


@contextlib.contextmanager
def native_output_captured(descriptors: tuple[int, ...] = (2,)):
    """Captures what is written to the given file descriptors inside the block (C++ logging at
    TensorFlow start-up, the TFLite converter's notices); shows it only if the block raises, or
    when TFSFT_VERBOSE=1."""
    if VERBOSE:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in descriptors}
    with tempfile.TemporaryFile() as captured:
        for fd in descriptors:
            os.dup2(captured.fileno(), fd)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            if failed:
                captured.seek(0)
                sys.stderr.write(captured.read().decode("utf-8", "replace"))


def _import_quietly():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with native_output_captured():
        import tensorflow

        # Device discovery prints its own notices (CUDA probing); do it while captured.
        tensorflow.config.list_physical_devices()
    if VERBOSE:
        return tensorflow
    tensorflow.get_logger().setLevel(logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    # Keras warns about choices tfsft makes on purpose (e.g. weights at a non-default size).
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(keras|tensorflow)(\.|$)")
    return tensorflow


tf = _import_quietly()
