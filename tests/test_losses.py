from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clic.losses import complexity_aware_loss, global_entropy, info_nce, masked_entropy_loss, patch_info_nce


def test_info_nce_equal_negatives_is_log_k_plus_one() -> None:
    """Perfectly matched pairs with K negatives of equal similarity: loss = log(1 + K e^{(s - 1)/t})."""
    d, k = 8, 15
    q = F.normalize(torch.randn(4, d), dim=1)
    queue = torch.zeros(k, d)
    queue[:, 0] = 1.0
    q = torch.zeros(4, d)
    q[:, 1] = 1.0  # q orthogonal to every negative (similarity 0)
    loss = info_nce(q, q, F.normalize(queue, dim=1), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(1 + k * math.exp(-1.0)), rel=1e-5)
    # positives as similar as negatives: log(K + 1) exactly
    assert info_nce(q, q, q[:1].expand(k, d), 0.07).item() == pytest.approx(math.log(k + 1), rel=1e-5)


def test_info_nce_matches_a_hand_written_reference() -> None:
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(6, 5), dim=1), F.normalize(torch.randn(6, 5), dim=1)
    queue = F.normalize(torch.randn(10, 5), dim=1)
    t = 0.2
    ref = 0.0
    for i in range(6):
        pos = math.exp(float(q[i] @ k[i]) / t)
        neg = sum(math.exp(float(q[i] @ queue[j]) / t) for j in range(10))
        ref += -math.log(pos / (pos + neg))
    assert info_nce(q, k, queue, t).item() == pytest.approx(ref / 6, rel=1e-5)
    # in-batch variant: negatives are the other keys
    ref_b = sum(-math.log(math.exp(float(q[i] @ k[i]) / t) / sum(math.exp(float(q[i] @ k[j]) / t)
                                                                  for j in range(6))) for i in range(6)) / 6
    assert info_nce(q, k, None, t).item() == pytest.approx(ref_b, rel=1e-5)


def test_patch_info_nce_matches_reference_loop() -> None:
    torch.manual_seed(1)
    b, l, d, t = 2, 3, 4, 0.5
    q = F.normalize(torch.randn(b, l, d), dim=-1)
    k = F.normalize(torch.randn(b, l, d), dim=-1)
    keys = k.reshape(-1, d)
    ref = 0.0
    for bi in range(b):
        for li in range(l):
            logits = (keys @ q[bi, li]) / t
            ref += -(logits[bi * l + li] - torch.logsumexp(logits, 0)).item()
    assert patch_info_nce(q, k, t).item() == pytest.approx(ref / (b * l), rel=1e-5)
    # anchor sampling keeps the same expectation; with all anchors it is identical
    assert patch_info_nce(q, k, t, max_anchors=b * l).item() == pytest.approx(ref / (b * l), rel=1e-5)
    g = torch.Generator().manual_seed(0)
    assert patch_info_nce(q, k, t, max_anchors=2, generator=g).isfinite()


def test_patch_info_nce_is_low_for_aligned_tokens() -> None:
    eye = torch.eye(8).view(2, 4, 8)
    assert patch_info_nce(eye, eye, 0.05).item() < 1e-3
    with pytest.raises(ValueError, match="do not hold the queries"):
        patch_info_nce(eye, eye[:, :3], 0.1)
    # keys of more images (every rank's): query image b's keys at image key_offset + b
    keys = torch.cat([-eye, eye])  # (4, 4, 8): images 2, 3 are the queries' keys
    assert patch_info_nce(eye, keys, 0.05, key_offset=2).item() < 1e-3
    assert patch_info_nce(eye, keys, 0.05, key_offset=0).item() > 1
    with pytest.raises(ValueError, match=r"offset 3\) do not hold"):
        patch_info_nce(eye, keys, 0.1, key_offset=3)


def test_masked_entropy_loss_counts_hidden_patches_only() -> None:
    pred = torch.tensor([[0.0, 1.0, 0.5], [0.2, 0.2, 0.2]])
    target = torch.tensor([[1.0, 1.0, 0.0], [0.2, 0.0, 0.2]])
    mask = torch.tensor([[True, False, True], [False, True, False]])
    # hidden errors: 1.0^2, 0.5^2, 0.2^2 over 3 hidden patches
    assert masked_entropy_loss(pred, target, mask).item() == pytest.approx((1 + 0.25 + 0.04) / 3)
    assert masked_entropy_loss(pred, target, torch.zeros_like(mask)).item() == 0.0


def _authors_loss(images: torch.Tensor, stage_maps: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference: CLIC's ``cal_batch_ge`` and ``ge_fae_error`` (xauat-liushipeng/CLIC at
    2f294ff, clic/ca_loss.py) as published, on the CPU (their ``.cuda()`` calls left out)."""
    from scipy.stats import entropy

    batch_ge = []
    for img in images:
        hist = torch.histc(img.mean(dim=0), bins=256, min=0, max=1)
        hist /= hist.sum()
        batch_ge.append(entropy(hist.numpy()))
    ge = torch.tensor(batch_ge)
    fae = torch.zeros_like(ge)
    for stage in stage_maps:
        n, c, w, h = stage_maps[stage].shape
        fae += stage_maps[stage].sum(dim=(1, 2, 3)) / (w * h * c)
    mask = torch.isfinite(fae) & torch.isfinite(ge)
    return F.mse_loss(fae[mask], ge[mask])


def test_complexity_aware_loss_is_the_authors() -> None:
    from clic.models.backbones import ResNetBackbone
    from clic.transforms.common import MEAN, STD

    torch.manual_seed(0)
    rgb = torch.rand(6, 3, 64, 64) ** torch.linspace(0.3, 3, 6).view(6, 1, 1, 1)  # flat to busy histograms
    rgb[5] = 1.0  # white: every normalised value above 1, an empty histogram (nan, left out)
    images = (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    stages = ResNetBackbone("resnet18").eval().forward_stages(images)
    reference = _authors_loss(images, {f"layer{i + 1}": s for i, s in enumerate(stages)})
    ge = global_entropy(images)
    assert torch.isnan(ge[5]) and torch.isfinite(ge[:5]).all() and (ge[:5] > 0).all()
    got = complexity_aware_loss(stages, ge)
    assert got.item() == pytest.approx(reference.item(), rel=1e-5)
    stages[0].retain_grad()
    got.backward()
    assert stages[0].grad is not None and stages[0].grad.abs().sum() > 0  # the activations learn, not the target


@pytest.mark.parametrize("kind", ["info_nce", "patch"])
def test_loss_falls_under_a_few_optimiser_steps(kind: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 12)
    net = torch.nn.Linear(12, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    noise = 0.1 * torch.randn(16, 12)

    def loss_fn() -> torch.Tensor:
        q = F.normalize(net(x), dim=-1)
        k = F.normalize(net(x + noise), dim=-1)
        if kind == "patch":
            return patch_info_nce(q.view(4, 4, 8), k.view(4, 4, 8).detach(), 0.2)
        return info_nce(q, k.detach(), None, 0.2)

    first = loss_fn().item()
    for _ in range(30):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 0.7 * first


def test_info_nce_exclusion_equals_dropping_those_negatives() -> None:
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(3, 6), dim=1), F.normalize(torch.randn(3, 6), dim=1)
    queue = F.normalize(torch.randn(7, 6), dim=1)
    exclude = torch.zeros(3, 7, dtype=torch.bool)
    exclude[0, [1, 4]] = True
    exclude[2, 6] = True
    got = info_nce(q, k, queue, 0.2, exclude)
    ref = []
    for i in range(3):
        keep = ~exclude[i]
        ref.append(info_nce(q[i:i + 1], k[i:i + 1], queue[keep], 0.2))
    assert got.item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-6)
    assert got.item() < info_nce(q, k, queue, 0.2).item()


def test_patch_info_nce_anchors_restrict_the_queries_not_the_keys() -> None:
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(2, 4, 5), dim=-1), F.normalize(torch.randn(2, 4, 5), dim=-1)
    anchors = torch.tensor([[True, False, True, False], [False, False, True, True]])
    got = patch_info_nce(q, k, 0.5, anchors=anchors)
    qf, kf = q.reshape(8, 5), k.reshape(8, 5)
    idx = anchors.reshape(8).nonzero().squeeze(1)
    ref = F.cross_entropy(qf[idx] @ kf.t() / 0.5, idx)  # each anchor against all 8 key tokens
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    qg = q.clone().requires_grad_(True)
    patch_info_nce(qg, k, 0.5, anchors=anchors).backward()
    assert qg.grad is not None and (qg.grad[~anchors] == 0).all() and (qg.grad[anchors] != 0).any()
