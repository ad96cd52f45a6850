"""Hand-crafted complexity measures, the classic baselines (numpy / scipy / Pillow only).

Each maps an RGB image to one number that grows with visual complexity:

- ``jpeg_bpp`` / ``png_bpp``: compressed bits per pixel (JPEG quality 75; PNG level 9);
- ``edge_density``: fraction of Canny edge pixels (Gaussian sigma 1, Sobel, non-maximum
  suppression, hysteresis at 0.1 / 0.2 of the maximum gradient);
- ``gradient``: mean Sobel gradient magnitude of the grey image in [0, 1];
- ``entropy``: Shannon entropy (bits) of the 256-bin grey-level histogram;
- ``regions``: number of regions of a Felzenszwalb-Huttenlocher graph segmentation (k = 300,
  min size 20) of the image resized to 64 px on its long side.

Images are measured at the size they are given (the evaluation uses the prepared cache, so all
images of a dataset share one short side).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage

MEASURES = ("jpeg_bpp", "png_bpp", "edge_density", "gradient", "entropy", "regions")


def compressed_bpp(img: Image.Image, fmt: str) -> float:
    """Bits per pixel of ``img`` saved as ``fmt`` (``JPEG`` at quality 75 or ``PNG`` at level 9)."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format=fmt, **({"quality": 75} if fmt == "JPEG" else {"compress_level": 9}))
    return buf.tell() * 8.0 / (img.size[0] * img.size[1])


def _sobel(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return ndimage.sobel(g, axis=1), ndimage.sobel(g, axis=0)


def canny(g: np.ndarray, sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> np.ndarray:
    """Boolean edge map (Canny 1986); thresholds are fractions of the maximum gradient."""
    s = ndimage.gaussian_filter(g, sigma)
    gx, gy = _sobel(s)
    mag = np.hypot(gx, gy)
    if mag.max() <= 0:
        return np.zeros_like(g, bool)
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    # the 4 quantised directions (0, 45, 90, 135 degrees); below, the neighbour offset of each
    sector = (np.round(angle / 45.0).astype(int)) % 4
    keep = np.zeros_like(mag, bool)
    padded = np.pad(mag, 1)
    h, w = mag.shape
    for k, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        fwd = padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        bwd = padded[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
        keep |= (sector == k) & (mag >= fwd) & (mag >= bwd)
    nms = np.where(keep, mag, 0.0)
    strong = nms >= high * mag.max()
    weak = nms >= low * mag.max()
    labels, n = ndimage.label(weak, structure=np.ones((3, 3)))
    if n == 0:
        return strong
    has_strong = np.zeros(n + 1, bool)
    has_strong[np.unique(labels[strong])] = True
    has_strong[0] = False
    return has_strong[labels]


def felzenszwalb_regions(img: Image.Image, k: float = 300.0, min_size: int = 20, side: int = 64) -> int:
    """Region count of the Felzenszwalb-Huttenlocher segmentation (8-connected grid graph, RGB
    Euclidean weights on a Gaussian-smoothed image; k on the 0..255 scale)."""
    small = img.convert("RGB")
    scale = side / max(small.size)
    if scale < 1:
        small = small.resize((max(1, round(small.size[0] * scale)), max(1, round(small.size[1] * scale))),
                             Image.Resampling.BILINEAR)
    a = ndimage.gaussian_filter(np.asarray(small, np.float64), sigma=(0.8, 0.8, 0))
    h, w, _ = a.shape
    idx = np.arange(h * w).reshape(h, w)
    edges = []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        # pixel (y, x) joins (y + dy, x + dx)
        x0, x1 = max(0, -dx), w - max(0, dx)
        ys, xs = slice(0, h - dy), slice(x0, x1)
        ys2, xs2 = slice(dy, h), slice(x0 + dx, x1 + dx)
        wgt = np.sqrt(((a[ys, xs] - a[ys2, xs2]) ** 2).sum(-1)).ravel()
        edges.append(np.stack([wgt, idx[ys, xs].ravel(), idx[ys2, xs2].ravel()], 1))
    e = np.concatenate(edges)
    e = e[np.argsort(e[:, 0], kind="stable")]
    parent = list(range(h * w))
    size = [1] * (h * w)
    internal = [0.0] * (h * w)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for wgt, u, v in e.tolist():
        ru, rv = find(int(u)), find(int(v))
        if ru != rv and wgt <= min(internal[ru] + k / size[ru], internal[rv] + k / size[rv]):
            parent[rv] = ru
            size[ru] += size[rv]
            internal[ru] = wgt
    for _, u, v in e.tolist():  # merge regions below the minimum size
        ru, rv = find(int(u)), find(int(v))
        if ru != rv and (size[ru] < min_size or size[rv] < min_size):
            parent[rv] = ru
            size[ru] += size[rv]
    return len({find(i) for i in range(h * w)})


def measure(img: Image.Image) -> dict[str, float]:
    """All measures of one image."""
    levels = np.asarray(img.convert("L"))  # (H, W) uint8
    g = levels / 255.0
    gx, gy = _sobel(g)
    hist = np.bincount(levels.ravel(), minlength=256) / g.size
    nz = hist[hist > 0]
    return {
        "jpeg_bpp": compressed_bpp(img, "JPEG"),
        "png_bpp": compressed_bpp(img, "PNG"),
        "edge_density": float(canny(g).mean()),
        "gradient": float(np.hypot(gx, gy).mean()),
        "entropy": float(abs((nz * np.log2(nz)).sum())),
        "regions": float(felzenszwalb_regions(img)),
    }
