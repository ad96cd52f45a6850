from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from clic.config import MocoViewConfig, RCMConfig, ShiftConfig
from clic.data.imageio import load_rgb
from clic.transforms.common import denormalize
from clic.transforms.masking import image_entropy, patch_entropy, random_mask
from clic.transforms.moco import MocoViews
from clic.transforms.rcm import RandomCropMix
from clic.transforms.shifted import ShiftedPatchViews, draw_shift


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
    with pytest.raises(ValueError, match="need more than the 7 crops"):
        RandomCropMix(64, crops=1, grid=3)


def test_rcm_config_guards() -> None:
    with pytest.raises(ValueError, match="rcm.grid=3 needs 9 cells"):
        RCMConfig(crops=1, grid=3)


@pytest.mark.parametrize("direction", ["horizontal", "vertical", "diagonal"])
def test_shifted_views_are_shifted_by_the_drawn_offset(photos, direction: str) -> None:
    """Without colour jitter, view2 == view1 moved by (dy, dx): overlapping pixels are identical."""
    cfg = ShiftConfig(directions=(direction,), jitter_p=0.0, min_shift=0.25, max_shift=0.75)
    views = ShiftedPatchViews(32, 8, cfg)
    img = load_rgb(photos[0])
    for seed in range(6):
        random.seed(seed)
        torch.manual_seed(seed)
        out = views(img)
        v1, v2 = out["view1"], out["view2"]
        dy, dx = out["shift"].tolist()
        assert v1.shape == v2.shape == (3, 32, 32)
        assert 2 <= max(abs(dy), abs(dx)) <= 6  # [0.25, 0.75] x patch 8
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
