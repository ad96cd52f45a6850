"""Device-side photometric views: each op against torchvision's per-image reference."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from clic.transforms.batch import BatchPhotometric, DeviceViews, blur, hsv_to_rgb, rgb_to_hsv
from clic.transforms.common import MEAN, STD


def _images(b: int = 4, size: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, size, size, generator=g)


def test_hsv_round_trip_and_hue_shift_match_torchvision() -> None:
    x = _images()
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    hsv = rgb_to_hsv(x)
    shifted = hsv_to_rgb(torch.cat(((hsv[:, :1] + 0.17) % 1.0, hsv[:, 1:]), 1))
    torch.testing.assert_close(shifted, torch.stack([TF.adjust_hue(im, 0.17) for im in x]), atol=1e-4, rtol=0)


def test_blur_matches_torchvision_per_sigma() -> None:
    x = _images()
    sigma = torch.tensor([0.3, 0.8, 1.5, 2.0])
    ref = torch.stack([TF.gaussian_blur(im, [7, 7], [s.item(), s.item()]) for im, s in zip(x, sigma, strict=True)])
    torch.testing.assert_close(blur(x, sigma, 7), ref, atol=1e-5, rtol=0)


def test_jitter_factors_reproduce_torchvision_sequence() -> None:
    """With every sample jittered, the batch op equals brightness, contrast, saturation, hue
    applied by torchvision with the factors drawn from the same generator."""
    x = _images()
    photo = BatchPhotometric((0.4, 0.4, 0.4, 0.1), jitter_p=1.0)
    out = photo(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    torch.rand(4, generator=g)  # the apply mask
    f_b, f_c, f_s = (0.6 + 0.8 * torch.rand(4, generator=g) for _ in range(3))
    f_h = -0.1 + 0.2 * torch.rand(4, generator=g)
    for i, im in enumerate(x):
        im = TF.adjust_brightness(im, f_b[i].item())
        im = TF.adjust_contrast(im, f_c[i].item())
        im = TF.adjust_saturation(im, f_s[i].item())
        im = TF.adjust_hue(im, f_h[i].item())
        torch.testing.assert_close(out[i], im, atol=1e-4, rtol=0)


def test_probabilities_and_grayscale() -> None:
    x = _images(b=256, size=8)
    assert torch.equal(BatchPhotometric((0.4, 0.4, 0.4, 0.1), jitter_p=0.0)(x, torch.Generator()), x)
    out = BatchPhotometric((0, 0, 0, 0), 0.0, grayscale_p=0.5)(x, torch.Generator().manual_seed(1))
    is_gray = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert 0.35 < is_gray.float().mean().item() < 0.65  # about half, each sample drawn on its own
    unchanged = (out == x).flatten(1).all(1)
    assert torch.equal(unchanged, ~is_gray)


def test_device_views_normalise_uint8_and_are_deterministic_per_generator() -> None:
    x = (_images() * 255).round().to(torch.uint8)
    views = DeviceViews({"query": BatchPhotometric((0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5)},
                        noise={"query": (0.05, 1.0)})
    a = views({"query": x, "image_id": torch.arange(4)}, torch.Generator().manual_seed(3))
    b = views({"query": x, "image_id": torch.arange(4)}, torch.Generator().manual_seed(3))
    c = views({"query": x, "image_id": torch.arange(4)}, torch.Generator().manual_seed(4))
    assert a["query"].dtype == torch.float32 and torch.equal(a["query"], b["query"])
    assert not torch.equal(a["query"], c["query"]) and torch.equal(a["image_id"], torch.arange(4))
    plain = DeviceViews({"query": BatchPhotometric((0, 0, 0, 0), 0.0)})({"query": x}, torch.Generator())
    ref = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(plain["query"], ref)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="jitter_p"):
        BatchPhotometric((0.4, 0.4, 0.4, 0.1), jitter_p=1.5)
    with pytest.raises(ValueError, match="hue"):
        BatchPhotometric((0.4, 0.4, 0.4, 0.7), jitter_p=0.5)
