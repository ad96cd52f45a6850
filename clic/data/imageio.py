"""Robust image decoding: every image the pipeline reads goes through :func:`load_rgb`.

EXIF orientation is applied; L, LA, P, RGBA, CMYK, I;16 and I (16/32-bit) modes become 8-bit
RGB (transparency composited on white); truncated files and decompression-bomb-sized images are
refused with an :class:`ImageError` that names the file.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own threshold
EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An image that cannot be used, with the offending path in the message."""


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None,
             strict: bool = False) -> Image.Image:
    """Decode ``path`` into an 8-bit RGB image with EXIF orientation applied.

    ``min_size``: the caller will downsample to this short side anyway, so JPEGs are decoded at the
    smallest DCT scale (1/2, 1/4 or 1/8) that keeps both sides >= ``min_size`` (Pillow's ``draft``):
    4-30x less decoding work for camera-sized photos. Other formats decode in full. ``strict``: the
    file is read once and a JPEG's data corrupted mid-stream is refused (:func:`check_jpeg_data`).
    """
    path = Path(path)
    if not strict:
        return _decode(path, str(path), max_pixels, min_size)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: image file is missing") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot decode image ({exc})") from None
    img = _decode(io.BytesIO(data), str(path), max_pixels, min_size)
    check_jpeg_data(path, data)  # Pillow decodes mid-stream corruption into garbage silently
    return img


def check_pixels(name: str, w: int, h: int, max_pixels: int) -> None:
    """Refuse an image of more than ``max_pixels`` (read from its header, before decoding)."""
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                         "(possible decompression bomb); raise data.max_pixels if it is genuine")


def check_jpeg_data(path: str | Path, data: bytes | None = None) -> None:
    """Decode a JPEG's whole entropy-coded data strictly (libjpeg-turbo through simplejpeg, at the
    smallest scale): data corrupted mid-stream, which Pillow decodes into garbage without a word,
    is an :class:`ImageError` naming the file (``path``; or the name of the bytes ``data``). Other
    formats pass (Pillow refuses their damage)."""
    import simplejpeg

    data = Path(path).read_bytes() if data is None else data
    if data[:2] != b"\xff\xd8":
        return
    try:
        space = simplejpeg.decode_jpeg_header(data)[2]
        simplejpeg.decode_jpeg(data, colorspace={"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}.get(space, "RGB"),
                               strict=True, min_height=1, min_width=1)
    except ValueError as exc:
        raise ImageError(f"{path}: corrupt JPEG data ({exc})") from None


def decode_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_size: int | None = None) -> Image.Image:
    """:func:`load_rgb` for an image file's bytes (e.g. a shard member); errors name ``name``."""
    return _decode(io.BytesIO(data), name, max_pixels, min_size)


def _decode(source: Path | io.BytesIO, name: str, max_pixels: int, min_size: int | None) -> Image.Image:
    try:
        with Image.open(source) as probe:
            check_pixels(name, *probe.size, max_pixels)
            if min_size is not None and probe.format == "JPEG":
                probe.draft(None, (min_size, min_size))
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                probe.load()  # decodes now: truncated files fail here, not later in a worker
            return to_rgb(ImageOps.exif_transpose(probe))
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"{name}: image file is missing") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as exc:  # Pillow names bytes by their object's repr: drop it
        detail = str(exc).replace(f" {source!r}", "").replace(repr(source), "")
        raise ImageError(f"{name}: cannot decode image ({detail})") from exc


@dataclass
class Encoded:
    """An image as the loader hands it on: ``data`` the JPEG file's bytes (1-D uint8), or the
    decoded pixels (3, H, W) uint8 for files the device decoder does not take; ``width`` and
    ``height`` as displayed; ``orientation`` the EXIF orientation (1-8) still to apply to the
    decoded bytes (1 for pixels, already upright)."""

    data: torch.Tensor
    width: int
    height: int
    name: str
    orientation: int = 1


def read_encoded(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Encoded:
    """The header of an image file's bytes (no decoding for RGB/grey JPEGs, MPO camera files
    included: their first image is a JPEG); other files are decoded here
    (:func:`clic.data.imageio.decode_bytes`). Errors name ``name``."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            (w, h), fmt, mode = probe.size, probe.format, probe.mode
            orientation = probe.getexif().get(EXIF_ORIENTATION, 1) if fmt in ("JPEG", "MPO") else 1
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: cannot decode image ({exc})") from exc
    check_pixels(name, w, h, max_pixels)
    if fmt in ("JPEG", "MPO") and mode in ("RGB", "L"):
        orientation = orientation if orientation in range(1, 9) else 1
        if orientation in (5, 6, 7, 8):  # a quarter turn: displayed sides swapped
            w, h = h, w
        return Encoded(torch.frombuffer(bytearray(data), dtype=torch.uint8), w, h, name, orientation)
    img = decode_bytes(data, name, max_pixels)
    pixels = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()
    return Encoded(pixels, img.width, img.height, name)


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """(..., H, W) as displayed for EXIF ``orientation`` (1-8), as Pillow's ``exif_transpose``."""
    if orientation in (5, 6, 7, 8):
        img = img.transpose(-1, -2)
    flips = {2: (-1,), 3: (-1, -2), 4: (-2,), 6: (-1,), 7: (-1, -2), 8: (-2,)}.get(orientation)
    return img.flip(flips) if flips else img


def decode_opened(img: Image.Image, min_size: int | None = None) -> Image.Image:
    """:func:`load_rgb`'s decoding for an image the caller opened or built: EXIF orientation
    applied, any mode to 8-bit RGB (16-bit rescaled, transparency composited on white). An untouched
    JPEG opened from a file is decoded from that file exactly as by path (reduced DCT scale for
    ``min_size``), so a path and ``Image.open(path)`` give the same pixels; the caller's image
    object is never modified."""
    filename = getattr(img, "filename", "")
    if min_size is not None and img.format == "JPEG" and getattr(img, "tile", None) and filename \
            and Path(filename).is_file():
        return load_rgb(filename, min_size=min_size)
    try:
        return to_rgb(ImageOps.exif_transpose(img))
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{filename or 'image'}: cannot decode image ({exc})") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha is composited on a white background."""
    mode = img.mode
    if mode == "RGB":
        return img.copy() if img.readonly else img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_short(img: Image.Image, short: int) -> Image.Image:
    """Resize so the shorter side is ``short`` (never upsamples)."""
    w, h = img.size
    if min(w, h) <= short:
        return img
    scale = short / min(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


def content_hash(img: Image.Image) -> str:
    """SHA-256 of the decoded RGB pixels and size (identical content, whatever the file format)."""
    digest = hashlib.sha256(f"{img.size[0]}x{img.size[1]}:".encode())
    digest.update(np.ascontiguousarray(np.asarray(img)).tobytes())
    return digest.hexdigest()


def perceptual_hash(img: Image.Image) -> int:
    """The 64-bit DCT hash (pHash: grey, 32x32 Lanczos, 2-D DCT-II, the 8x8 lowest frequencies
    against their median; the definition of ``imagehash.phash``). Resizing and re-encoding move
    a photo's hash by a few bits, distinct photos' hashes differ in ~32 (:func:`hamming`)."""
    from scipy.fft import dct

    grey = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = dct(dct(grey, axis=0), axis=1)[:8, :8]  # (8, 8)
    bits = (low > np.median(low)).ravel()
    return int(sum(1 << (63 - i) for i, b in enumerate(bits) if b))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between 64-bit hashes: a (N,) and b (M,) uint64 -> (N, M)."""
    return np.bitwise_count(a[:, None] ^ b[None, :])
