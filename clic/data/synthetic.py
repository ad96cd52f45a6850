"""A deterministic, seeded generator of images whose complexity is controlled.

Each image draws one latent level ``z ~ U(0, 1)`` from ``(seed, index)``; every knob grows with
``z`` (object count, texture frequency, palette size, clutter) while object size shrinks, and the
label is ``z``. Styles (the IC9600-like category prefix of each name):

- ``shapes``: flat shapes on a plain or gradient background;
- ``texture``: sums of oriented sinusoidal gratings, frequency and octave count rising with z;
- ``stripes``: bands of colour whose count rises with z;
- ``mixed``: shapes over a texture with clutter strokes.

:func:`generate_ic9600` writes IC9600's exact on-disk layout (``images/``, ``train.txt``,
``test.txt`` with ``<name><two spaces><score>`` lines), so the default pipeline exercises the
IC9600 reader. :func:`generate_classification` writes a labelled ``train/`` + ``val/`` class-folder
set (class = the shape drawn, complexity in [0, 0.4]) for the transfer stage.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")


def _palette(rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    return [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(n)]  # type: ignore[misc]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int]) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif kind == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif kind == "ring":
        draw.ellipse(box, outline=fill, width=max(1, int(r / 3)))
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}; expected one of {', '.join(SHAPES)}")


def _texture(rng: np.random.Generator, w: int, h: int, z: float, colours: int) -> np.ndarray:
    """Sum of oriented gratings; frequency and octave count rise with z; quantised palette."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(w, h)
    field = np.zeros((h, w), np.float32)
    octaves = 1 + int(round(z * 5))
    for o in range(octaves):
        freq = (1.0 + 30.0 * z) * (1.6 ** o) * rng.uniform(0.7, 1.3)
        theta = rng.uniform(0, math.pi)
        phase = rng.uniform(0, 2 * math.pi)
        field += np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase) / (1 + o)
    field = (field - field.min()) / (np.ptp(field) + 1e-6)
    levels = np.minimum((field * colours).astype(np.int64), colours - 1)
    pal = np.array(_palette(rng, colours), np.uint8)
    return pal[levels]


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    c0, c1 = np.array(_palette(rng, 2), np.float32)
    if rng.uniform() < 0.5:  # plain
        return np.broadcast_to(c0, (h, w, 3)).astype(np.uint8).copy()
    t = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    return (c0 * (1 - t) + c1 * t).repeat(h, axis=0).astype(np.uint8)


def render(seed: int, index: int, size: int, style: str, shape: str | None = None,
           z: float | None = None) -> tuple[Image.Image, float]:
    """One image and its complexity label ``z`` in [0, 1], deterministic in ``(seed, index)``."""
    rng = np.random.default_rng([seed, index])
    level = float(rng.uniform()) if z is None else float(z)
    aspect = rng.uniform(0.75, 1.33)
    w, h = (size, int(round(size * aspect))) if aspect >= 1 else (int(round(size / aspect)), size)
    colours = 2 + int(round(level * 14))
    if style in ("texture", "mixed"):
        arr = _texture(rng, w, h, level if style == "texture" else level * 0.6, colours)
    elif style == "stripes":
        bands = 1 + int(round(level * 24))
        stripe_pal = np.array(_palette(rng, colours), np.uint8)
        edges = np.sort(rng.uniform(0, 1, bands))
        pos = np.linspace(0, 1, w if rng.uniform() < 0.5 else h)
        line = stripe_pal[np.searchsorted(edges, pos) % colours]
        arr = (np.broadcast_to(line[None], (h, w, 3)) if len(pos) == w
               else np.broadcast_to(line[:, None], (h, w, 3))).copy()
    else:
        arr = _background(rng, w, h)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    if style in ("shapes", "mixed") or shape is not None:
        n_obj = 1 + int(round(level * 30))
        pal = _palette(rng, colours)
        r_max = max(3.0, min(w, h) * (0.35 - 0.27 * level))
        for _ in range(n_obj):
            r = rng.uniform(0.5, 1.0) * r_max
            kind = shape or SHAPES[int(rng.integers(len(SHAPES)))]
            _draw_shape(draw, kind, rng.uniform(0, w), rng.uniform(0, h), r, pal[int(rng.integers(len(pal)))])
    if style == "mixed":
        for _ in range(int(round(level * 40))):  # clutter strokes
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            ang, ln = rng.uniform(0, 2 * math.pi), rng.uniform(3, min(w, h) / 3)
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.line((x0, y0, x0 + ln * math.cos(ang), y0 + ln * math.sin(ang)), fill=fill, width=1)
    return img, level


def generate_ic9600(root: str | Path, seed: int, n_train: int, n_test: int, size: int,
                    categories: tuple[str, ...]) -> Path:
    """Write a synthetic dataset in IC9600's on-disk layout under ``root``; returns ``root``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, start, count in (("train", 0, n_train), ("test", n_train, n_test)):
        lines = []
        for i in range(start, start + count):
            style = categories[i % len(categories)]
            name = f"{style}_{i:08d}.jpg"
            img, z = render(seed, i, size, style)
            img.save(root / "images" / name, quality=95)
            lines.append(f"{name}  {z:.6f}")
        (root / f"{split}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    return root


def generate_classification(root: str | Path, seed: int, n_classes: int, n_train: int, n_val: int,
                            size: int) -> Path:
    """Write ``train/<class>/`` and ``val/<class>/`` folders: class = the shape drawn."""
    root = Path(root)
    for split, count, offset in (("train", n_train, 10_000_000), ("val", n_val, 20_000_000)):
        for c, shape in enumerate(SHAPES[:n_classes]):
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                idx = offset + c * 100_000 + i
                # low to mid complexity (z <= 0.4) so the class, not clutter, dominates the image
                img, _ = render(seed, idx, size, "shapes", shape=shape, z=0.4 * (i % 10) / 9)
                img.save(folder / f"{shape}_{i:05d}.png")
    return root
