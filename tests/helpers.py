"""Helpers shared by the tests: tiny recipes and the real CLI in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def write_config(path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def tiny_recipe(train: str, run_dir: str, stages: str | None = None, extra: str = "") -> str:
    """A recipe that trains in seconds: mobilenet_v3_small at 32 px, random init.

    ``stages`` is YAML list items (``- {...}``), one per line, indented any way.
    """
    stages = stages or """
      - {name: head, epochs: 1, learning_rate: 1.0e-3, trainable: head}
      - {name: finetune, epochs: 1, learning_rate: 1.0e-4, trainable: top_blocks:1}"""
    stage_lines = "\n".join("  " + line for line in textwrap.dedent(stages).strip().splitlines())
    return (f"data:\n  train: {train}\n  image_size: [32, 32]\n  batch_size: 8\n"
            f"model:\n  backbone: mobilenet_v3_small\n  weights: none\n"
            f"stages:\n{stage_lines}\n"
            f"run:\n  dir: {run_dir}\n  seed: 0\n") + textwrap.dedent(extra)


def run_cli(*args: str, cwd=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs the real ``tfsft`` command in a subprocess."""
    return subprocess.run([sys.executable, "-m", "tfsft", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
