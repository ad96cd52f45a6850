"""Losses as pure functions of tensors.

Shape vocabulary: B batch, L patches per image, D embedding, K queue length, N anchors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None, temperature: float,
             exclude: torch.Tensor | None = None, key_offset: int = 0) -> torch.Tensor:
    """MoCo's InfoNCE (He et al. 2020): positive ``q . k``, negatives ``q . queue``.

    q, k: (B, D) L2-normalised; queue: (K, D) L2-normalised negatives, or None for in-batch
    negatives (logits ``q @ k.T``, positives on the diagonal, as in MoCo v3 / SimCLR-style); then
    ``k`` may hold more keys than queries (B' >= B, every rank's keys), query b's positive at row
    ``key_offset + b``.
    exclude: (B, K) bool, True = drop that queued key from this query's negatives (a stale key of
    the query's own image is a false negative); only with a queue.
    """
    if queue is None:
        logits = q @ k.t() / temperature  # (B, B')
        labels = torch.arange(q.shape[0], device=q.device) + key_offset
        return F.cross_entropy(logits, labels)
    pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    neg = q @ queue.t()  # (B, K)
    if exclude is not None:
        neg = neg.masked_fill(exclude, float("-inf"))  # exp(-inf) = 0: removed from the denominator
    logits = torch.cat([pos, neg], dim=1) / temperature  # (B, 1 + K)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def patch_info_nce(q_tokens: torch.Tensor, k_tokens: torch.Tensor, temperature: float,
                   max_anchors: int | None = None, generator: torch.Generator | None = None,
                   anchors: torch.Tensor | None = None, key_offset: int = 0) -> torch.Tensor:
    """CLICv2 patch-wise InfoNCE: token l of image b in the query view is positive with token l of
    image b in the key view; every other key token of the batch (same image or not) is a negative.

    q_tokens, k_tokens: (B, L, D) L2-normalised along D. ``anchors``: (B, L) bool, True = the query
    token may serve as an anchor (CLICv2 passes the visible tokens, so masked-entropy masking does
    not change the contrastive task); None = every token. ``max_anchors`` bounds memory by sampling
    N of the eligible query tokens; each is still contrasted with all B*L key tokens, so the
    logits are (N, B*L). ``k_tokens`` may hold more images than the queries, (B', L, D) with
    B' >= B (every rank's key tokens under DDP), query image b's keys being image
    ``key_offset + b``; the logits are then (N, B'*L).
    """
    b, l, d = q_tokens.shape
    if k_tokens.shape[1:] != q_tokens.shape[1:] or not 0 <= key_offset <= k_tokens.shape[0] - b:
        raise ValueError(f"patch_info_nce: keys {tuple(k_tokens.shape)} (offset {key_offset}) do not hold the "
                         f"queries' {tuple(q_tokens.shape)}")
    q = q_tokens.reshape(b * l, d)  # (B*L, D)
    k = k_tokens.reshape(-1, d)  # (B'*L, D)
    labels = torch.arange(b * l, device=q.device) + key_offset * l
    if anchors is not None:
        if anchors.shape != (b, l):
            raise ValueError(f"patch_info_nce: anchors must be (B, L) = {(b, l)}, got {tuple(anchors.shape)}")
        keep = anchors.reshape(b * l).nonzero().squeeze(1)  # (N',)
        q, labels = q[keep], labels[keep]
    n = q.shape[0]
    if max_anchors is not None and max_anchors < n:
        idx = torch.randperm(n, generator=generator, device="cpu")[:max_anchors].to(q.device)
        q, labels = q[idx], labels[idx]  # (N, D), (N,)
    logits = q @ k.t() / temperature  # (N, B*L)
    return F.cross_entropy(logits, labels)


def masked_entropy_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CLICv2 masked entropy modelling: MSE between predicted and true patch entropy, averaged over
    hidden patches only (MAE's ``forward_loss`` with an entropy target).

    pred, target: (B, L); mask: (B, L) bool, True = hidden.
    """
    m = mask.to(pred.dtype)
    return ((pred - target) ** 2 * m).sum() / m.sum().clamp_min(1.0)


def global_entropy(images: torch.Tensor) -> torch.Tensor:
    """Each image's global entropy as CLIC's authors compute it (xauat-liushipeng/CLIC,
    ``clic/CAL.py`` at 791bc58, ``compute_batch_ge``; ``cal_batch_ge`` of ``clic/ca_loss.py`` at
    2f294ff): the channel mean of the tensor the encoder sees (after
    ImageNet normalisation), its 256-bin histogram on [0, 1] (values outside are not counted),
    normalised, Shannon entropy in nats (``scipy.stats.entropy``). (B, 3, H, W) -> (B,); an image
    with no value in [0, 1] gives nan (their code too), which the loss leaves out."""
    grey = images.detach().float().mean(dim=1).flatten(1)  # (B, H*W)
    inside = (grey >= 0) & (grey <= 1)
    bins = (grey * 256).long().clamp_(0, 255)  # torch.histc's bins: [k/256, (k+1)/256), 1.0 in the last
    hist = torch.zeros(grey.shape[0], 256, device=grey.device).scatter_add_(1, bins, inside.float())
    p = hist / hist.sum(dim=1, keepdim=True)
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim=1)


def complexity_aware_loss(stage_features: list[torch.Tensor], entropy: torch.Tensor) -> torch.Tensor:
    """CLIC's complexity-aware loss as the authors compute it (``compute_ge_fae_error`` in
    ``clic/CAL.py`` at 791bc58; ``ge_fae_error`` and ``cal_stage_fae`` in ``clic/ca_loss.py`` at
    2f294ff; their ``train.py`` calls it with the four ResNet stages' outputs and ``--ca_lambda
    0.25``): per image the sum over stages of the mean
    activation, against :func:`global_entropy`, MSE over the images where both are finite.

    stage_features: backbone stage outputs, each (B, C, H, W); entropy: (B,).
    """
    energy = torch.stack([f.float().mean(dim=(1, 2, 3)) for f in stage_features], dim=1).sum(dim=1)  # (B,)
    target = entropy.float()
    keep = torch.isfinite(energy) & torch.isfinite(target)
    return F.mse_loss(energy[keep], target[keep])
