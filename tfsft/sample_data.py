"""A small labelled image folder, generated deterministically, for the quickstart and the tests.

Each class is a kind of shape (circle, square, triangle, ...) drawn at a random size, position,
rotation and colour on a noisy background. The images are real files on disk (JPEG mostly, some
PNG and BMP, some in nested folders) and are read by the same pipeline as a user's folder.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")


def make_shapes(root: str, *, images_per_class: int = 100, image_size: int = 64,
                num_classes: int = 3, seed: int = 0, shapes: Optional[Sequence[str]] = None) -> list[str]:
    """Writes ``root/<shape>/...`` and returns the class names: the first ``num_classes`` of
    ``SHAPES``, or the given ``shapes``.

    The same arguments always give byte-identical files.
    """
    from PIL import Image, ImageDraw

    names = list(shapes) if shapes is not None else list(SHAPES[:num_classes])
    if not 2 <= len(names) <= len(SHAPES) or not set(names) <= set(SHAPES):
        raise ValueError(f"expected 2 to {len(SHAPES)} classes from {', '.join(SHAPES)}, got {names}")
    rng = np.random.default_rng(seed)
    for name in names:
        for index in range(images_per_class):
            background = rng.integers(0, 256, size=3)
            noise = rng.normal(0, 18, size=(image_size, image_size, 3))
            pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            draw = ImageDraw.Draw(image)
            # A colour far from the background, so the shape is always visible.
            colour = tuple(int(c) for c in (background + rng.integers(90, 166, size=3)) % 256)
            radius = image_size * rng.uniform(0.2, 0.38)
            centre = rng.uniform(radius + 1, image_size - radius - 1, size=2)
            angle = rng.uniform(0, 2 * math.pi)
            _draw(draw, name, centre, radius, angle, colour, image_size)
            folder = os.path.join(root, name, "more") if index % 5 == 4 else os.path.join(root, name)
            os.makedirs(folder, exist_ok=True)
            extension = ("png", "bmp", "JPG", "jpeg")[index % 7] if index % 7 < 4 else "jpg"
            path = os.path.join(folder, f"{name}_{index:03d}.{extension}")
            file_format = {"png": "PNG", "bmp": "BMP"}.get(extension, "JPEG")
            options = {"quality": 92} if file_format == "JPEG" else {}
            image.save(path, format=file_format, **options)
    return names


def _polygon(centre, radius, angle, corners, inner=None):
    points = []
    steps = corners * (2 if inner else 1)
    for step in range(steps):
        r = inner if inner and step % 2 else radius
        theta = angle + 2 * math.pi * step / steps
        points.append((centre[0] + r * math.cos(theta), centre[1] + r * math.sin(theta)))
    return points


def _draw(draw, name, centre, radius, angle, colour, image_size):
    x, y = centre
    if name == "circle":
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    elif name == "ring":
        width = max(2, int(radius * 0.35))
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=colour, width=width)
    elif name == "square":
        draw.polygon(_polygon(centre, radius, angle, 4), fill=colour)
    elif name == "triangle":
        draw.polygon(_polygon(centre, radius, angle, 3), fill=colour)
    elif name == "star":
        draw.polygon(_polygon(centre, radius, angle, 5, inner=radius * 0.45), fill=colour)
    elif name == "cross":
        width = max(2, int(radius * 0.45))
        for theta in (angle, angle + math.pi / 2):
            dx, dy = radius * math.cos(theta), radius * math.sin(theta)
            draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=colour, width=width)
