from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clic.config import MocoViewConfig, PretrainConfig, RCMConfig, ShiftConfig
from clic.data.dataset import ViewDataset
from clic.data.imageio import load_rgb
from clic.data.table import Record
from clic.params import from_dict
from clic.transforms.common import denormalize
from clic.transforms.masking import image_entropy, patch_entropy, random_mask
from clic.transforms.moco import MocoViews
from clic.transforms.plan import draw_shift
from clic.transforms.rcm import RandomCropMix, extra_mosaics
from clic.transforms.shifted import ShiftedPatchViews


def test_moco_views_shapes_and_differ(photos) -> None:
    img = load_rgb(photos[0])
    views = MocoViews(48, MocoViewConfig(key_noise_p=1.0, key_rotation_deg=30, key_vflip_p=0.5))(img)
    assert set(views) == {"query", "key"}
    assert views["query"].shape == views["key"].shape == (3, 48, 48)
    assert not torch.allclose(views["query"], views["key"])


def test_rcm_mosaic_is_made_of_the_source(photos) -> None:
    random.seed(0)
    img = load_rgb(photos[2])
    rcm = RandomCropMix(64, crops=3, grid=2, aug_p=0.0)
    boxes = rcm.crop_boxes(*img.size)
    s = min(img.size)
    sides = sorted({b[2] - b[0] for b in boxes})
    assert len(boxes) == 3 + 6 + 12
    assert sides == sorted({s // 12, s // 6, s // 3})
    mosaic = rcm(img)
    assert mosaic.size == (64, 64)
    # without augmentation each cell is a resized crop: its colours come from the source image
    src_mean = torch.tensor(np.asarray(img.resize((8, 8))), dtype=torch.float).view(-1, 3).mean(0)
    m_mean = torch.tensor(np.asarray(mosaic.resize((8, 8))), dtype=torch.float).view(-1, 3).mean(0)
    assert (src_mean - m_mean).abs().max() < 60


def test_rcm_config_guards() -> None:
    def rcm(**kw: object) -> RCMConfig:  # built as params are: errors at the dotted key
        return from_dict(RCMConfig, kw, "rcm")
    with pytest.raises(ValueError, match="rcm.grid=3 needs 9 cells"):
        rcm(mode="pool", crops=1, grid=3)
    assert rcm(mode="authors", crops=1, grid=3).grid == 3  # authors: copies fill any grid
    with pytest.raises(ValueError, match="rcm.grid must be >= 2 with rcm.mode authors"):
        rcm(mode="authors", grid=1)
    with pytest.raises(ValueError, match=r"rcm.max_upscale must be >= 1 \(.inf: no cap\), got 0.5"):
        rcm(max_upscale=0.5)
    with pytest.raises(ValueError, match="rcm.max_upscale must be >= 1"):
        rcm(max_upscale=float("nan"))
    with pytest.raises(ValueError, match="rcm.jitter must be >= 0"):
        rcm(jitter=-0.1)
    with pytest.raises(ValueError, match="rcm.aug_p must be a probability"):
        rcm(aug_p=1.5)
    with pytest.raises(ValueError, match="pretrain.clic.rcm.mode: expected one of pool, authors, got 'tiles'"):
        from_dict(PretrainConfig, {"method": "clic", "rcm": {"mode": "tiles"}}, "pretrain.clic")
    with pytest.raises(ValueError, match="pretrain.clic.rcm.max_upscale: expected float, got 'big'"):
        from_dict(PretrainConfig, {"method": "clic", "rcm": {"max_upscale": "big"}}, "pretrain.clic")
    with pytest.raises(ValueError, match="pool mode .* give out_size"):
        RandomCropMix(None)


def _coordinates(width: int = 240, height: int = 180) -> Image.Image:
    """An image whose pixel (x, y) holds (x, y, 0): any tile tells where it was cut from."""
    ys, xs = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.uint8))


def _tiles(mosaic: Image.Image, grid: int) -> list[np.ndarray]:
    a = np.asarray(mosaic).astype(int)
    t = a.shape[0] // grid
    return [a[r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(grid) for c in range(grid)]


@pytest.mark.parametrize("grid", [2, 3])
def test_rcm_authors_mosaic_is_two_crops_of_one_scale_at_native_size(grid: int) -> None:
    """authors mode: every tile is one of two source crops of one scale (or a flipped copy of one),
    pasted unresized, so the mosaic's side is grid * tile."""
    img = _coordinates()
    rcm = RandomCropMix(None, crops=3, grid=grid, aug_p=0.0, mode="authors")
    sides_seen = set()
    for seed in range(24):
        random.seed(seed)
        torch.manual_seed(seed)
        mosaic = rcm(img)
        side = mosaic.size[0] // grid
        assert mosaic.size == (grid * side, grid * side)
        assert side in (180 // 3, 180 // 6, 180 // 12)
        sides_seen.add(side)
        origins, exact = [], 0
        for tile in _tiles(mosaic, grid):
            x0, y0 = tile[..., 0].min(), tile[..., 1].min()
            # a crop of side `side` at (x0, y0): each coordinate appears, nothing else does
            assert tile[..., 0].max() - x0 == side - 1 and tile[..., 1].max() - y0 == side - 1
            assert (tile[..., 2] == 0).all()
            ramp = np.arange(side)
            unflipped = (tile[..., 0] == x0 + ramp[None, :]).all() and (tile[..., 1] == y0 + ramp[:, None]).all()
            exact += int(unflipped)
            origins.append((int(x0), int(y0)))
        assert len(set(origins)) == 2, origins
        assert exact >= 2  # the two originals are pasted as cut
        counts = sorted(origins.count(o) for o in set(origins))
        assert counts == [grid * grid // 2, grid * grid - grid * grid // 2]  # copies alternate
    assert sides_seen == {60, 30, 15}  # the scale is drawn per mosaic


def test_rcm_authors_resizes_the_whole_mosaic_within_the_cap() -> None:
    img = _coordinates()
    rcm = RandomCropMix(96, crops=3, grid=2, aug_p=0.5, mode="authors", max_upscale=2.0)
    for seed in range(12):
        random.seed(seed)
        torch.manual_seed(seed)
        side = rcm.draw_side(180)
        assert 96 / (2 * side) <= 2.0  # the s/12 scale (mosaic 30 px -> 96 px) is never drawn
        assert rcm(img).size == (96, 96)


@pytest.mark.parametrize(("max_upscale", "allowed"), [(2.0, {60}), (3.0, {60, 30}), (float("inf"), {60, 30, 15})])
def test_rcm_pool_never_upsamples_a_tile_beyond_max_upscale(max_upscale: float, allowed: set[int]) -> None:
    """Each cell of a pool mosaic (aug off) spans the coordinates of its crop: the crop side is
    read back from the pixels, and cell / side stays within max_upscale."""
    img = _coordinates()  # short side 180: crops of side 60, 30, 15
    out, grid = 128, 2
    cell = out // grid
    rcm = RandomCropMix(out, crops=3, grid=grid, aug_p=0.0, max_upscale=max_upscale)
    seen = set()
    for seed in range(20):
        random.seed(seed)
        boxes = rcm.draw_boxes(*img.size)
        assert len(boxes) == grid * grid
        seen |= {b[2] - b[0] for b in boxes}
        random.seed(seed)
        for tile in _tiles(rcm(img), grid):
            side = round(float(tile[..., 0].max() - tile[..., 0].min()) * cell / (cell - 1))  # bicubic spans side - 1
            assert min(abs(side - a) for a in (60, 30, 15)) <= 2
            assert cell / side <= max_upscale * 1.1 or not np.isfinite(max_upscale)
    assert seen == allowed


def test_rcm_pool_uses_the_largest_scale_when_none_is_large_enough() -> None:
    rcm = RandomCropMix(128, crops=3, grid=2, max_upscale=2.0)
    random.seed(0)
    boxes = rcm.draw_boxes(40, 40)  # sides 13, 6, 3 for cells of 64: none within 2x
    assert [b[2] - b[0] for b in boxes] == [13] * 4  # the 3 crops of s/c, topped up with a fourth


@pytest.mark.parametrize("source_resolution", [True, False])
def test_extra_mosaics_are_cut_from_the_source_file(tmp_path: Path, source_resolution: bool) -> None:
    """rcm.source_resolution: an extra authors mosaic is cut from the 240x180 source, not the 80x60
    cache (tile sides 60/30/15 against 20/10/5)."""
    _coordinates().save(tmp_path / "src.png")
    _coordinates().resize((80, 60)).save(tmp_path / "cache.png")
    rec = Record("a", "src.png", None, "train", width=240, height=180, cache="cache.png")
    cfg = RCMConfig(mode="authors", pairing="extra", source_resolution=source_resolution)
    ds = ViewDataset([rec], tmp_path, lambda img: {"size": img.size}, extra=extra_mosaics(cfg, 64),
                     extra_per_image=3)
    assert ds[0]["size"] == (80, 60)  # the record itself still comes from the cache
    tiles = {ds[i]["size"][0] // 2 for i in range(1, 4)}
    assert tiles <= ({60, 30, 15} if source_resolution else {20, 10, 5}), tiles


def test_clic_training_images_and_mosaics_come_from_one_decode(tmp_path: Path) -> None:
    """A large JPEG source: without mosaics a training image is decoded at the reduced DCT scale
    (``decode_side``); with extra mosaics cut at source resolution, the image is decoded in full
    too, so both halves of CLIC's data come from the same (full-size) decode."""
    _coordinates().resize((960, 720)).save(tmp_path / "big.jpg", quality=95)
    rec = Record("a", "big.jpg", None, "train", width=960, height=720)
    plain = ViewDataset([rec], tmp_path, lambda img: {"size": img.size}, decode_side=64)
    assert plain[0]["size"] == (120, 90)  # 1/8 keeps both sides >= 64
    cfg = RCMConfig(mode="authors", pairing="extra", source_resolution=True)
    ds = ViewDataset([rec], tmp_path, lambda img: {"size": img.size}, extra=extra_mosaics(cfg, 64),
                     extra_per_image=3, decode_side=64)
    assert ds[0]["size"] == (960, 720)
    tiles = {ds[i]["size"][0] // 2 for i in range(1, 4)}
    assert tiles <= {240, 120, 60}, tiles  # s/3, s/6, s/12 of the full 720 px short side


def test_moco_views_with_authors_rcm_key(photos) -> None:
    views = MocoViews(48, MocoViewConfig(), RCMConfig(mode="authors"))
    out = views(load_rgb(photos[1]))
    assert out["key"].shape == out["query"].shape == (3, 48, 48)


@pytest.mark.parametrize("direction", ["horizontal", "vertical", "diagonal"])
def test_shifted_views_are_shifted_by_the_drawn_offset(photos, direction: str) -> None:
    """Without colour jitter, view2 == view1 moved by (dy, dx): overlapping pixels are identical."""
    cfg = ShiftConfig(directions=(direction,), jitter_p=0.0, min_shift=0.25, max_shift=0.45)
    views = ShiftedPatchViews(32, 8, cfg)
    img = load_rgb(photos[0])
    for seed in range(6):
        random.seed(seed)
        torch.manual_seed(seed)
        out = views(img)
        v1, v2 = out["view1"], out["view2"]
        dy, dx = out["shift"].tolist()
        assert v1.shape == v2.shape == (3, 32, 32)
        assert 2 <= max(abs(dy), abs(dx)) <= 3  # [0.25, 0.45] x patch 8, below half a patch
        if direction == "horizontal":
            assert dy == 0 and dx != 0
        elif direction == "vertical":
            assert dx == 0 and dy != 0
        else:
            assert abs(dy) == abs(dx) != 0
        # view2[y, x] = canvas[o + d + y] = view1[y + d] where both exist
        ys, xs = slice(max(0, -dy), 32 - max(0, dy)), slice(max(0, -dx), 32 - max(0, dx))
        ys1, xs1 = slice(max(0, dy), 32 + min(0, dy)), slice(max(0, dx), 32 + min(0, dx))
        assert torch.equal(v2[:, ys, xs], v1[:, ys1, xs1])
        assert not torch.equal(v1, v2)


def test_shift_disabled_gives_identical_geometry(photos) -> None:
    cfg = ShiftConfig(enabled=False, jitter_p=0.0)
    out = ShiftedPatchViews(32, 8, cfg)(load_rgb(photos[1]))
    assert out["shift"].tolist() == [0, 0]
    assert torch.equal(out["view1"], out["view2"])
    assert draw_shift(8, cfg) == (0, 0)


def test_random_mask_hides_exactly_the_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    mask = random_mask(5, 16, 0.4, generator=g)
    assert mask.shape == (5, 16) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [6] * 5  # round(0.4 * 16)
    assert len({tuple(m.tolist()) for m in mask}) > 1  # per-sample masks


def test_patch_entropy_constant_is_zero_and_uniform_is_one() -> None:
    const = torch.full((1, 3, 16, 32), 0.5)
    assert torch.allclose(patch_entropy(const, 16), torch.zeros(1, 2))
    levels = torch.arange(256, dtype=torch.uint8).view(16, 16)  # every grey level once
    img = levels.expand(3, 16, 16)[None]  # (1, 3, 16, 16), R=G=B
    assert torch.allclose(patch_entropy(img, 16), torch.ones(1, 1))  # 8 bits / 8
    two = torch.zeros(1, 3, 16, 16)
    two[..., :8, :] = 1.0  # half black half white: 1 bit
    assert torch.allclose(patch_entropy(two, 16), torch.full((1, 1), 1 / 8))
    assert torch.allclose(image_entropy(two), torch.full((1,), 1 / 8))
    # patches are in row-major order: only the second patch is non-constant
    mixed = torch.zeros(1, 3, 8, 16)
    mixed[..., :4, 8:] = 1.0
    assert patch_entropy(mixed, 8)[0].tolist() == pytest.approx([0.0, 1 / 8])


def test_denormalize_inverts_the_view_normalisation(photos) -> None:
    from clic.transforms.common import to_tensor_normalized

    img = Image.open(photos[0]).convert("RGB").resize((16, 16))
    x = to_tensor_normalized()(img)
    from torchvision.transforms.functional import to_tensor
    assert torch.allclose(denormalize(x[None])[0], to_tensor(img), atol=1e-5)


@pytest.mark.parametrize("patch", [4, 8, 14, 16])
def test_shift_positive_overlaps_the_anchor_more_than_any_negative(patch: int) -> None:
    """Patch (i, j) of view 2 covers view 1's patch (i, j) moved by (dy, dx): its pixel overlap
    with the anchor, (1 - |dy|/P)(1 - |dx|/P), must beat every neighbouring (negative) patch's."""

    cfg = ShiftConfig(min_shift=0.0, max_shift=0.49)
    random.seed(0)
    for _ in range(500):
        dy, dx = draw_shift(patch, cfg)
        assert 2 * abs(dy) < patch and 2 * abs(dx) < patch
        fy, fx = abs(dy) / patch, abs(dx) / patch
        positive = (1 - fy) * (1 - fx)
        negatives = [fy * (1 - fx), (1 - fy) * fx, fy * fx]  # the neighbours in the shift's direction
        assert positive > max(negatives)
    assert draw_shift(8, ShiftConfig(enabled=False)) == (0, 0)
    with pytest.raises(ValueError, match="max_shift < 0.5"):
        ShiftConfig(max_shift=0.5)
