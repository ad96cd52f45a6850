"""Heads on frozen features: complexity regression and classification.

Protocols for regression (never touching test labels for any choice):
1. ``ridge``: closed-form ridge regression on standardised features; the penalty is chosen by
   k-fold cross-validation on the training split only (lowest mean squared error).
2. ``sgd``: the papers' style, a linear head trained by SGD (MSE) on frozen features.
3. ``icnet``: ICNet's map + score head trained on frozen spatial maps (N, D, h, w), the CLIC
   paper's IC9600 protocol (:mod:`clic.evaluation.icnet`).

A fitted linear head is a :class:`~clic.models.heads.LinearHead` (mean, scale, weight, bias):
``pred = ((x - mean) / scale) @ w + b``, the same for ridge and sgd, so a scorer stores one format;
icnet fits an :class:`~clic.models.heads.ICNetHead`. Both have ``predict`` and ``state``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import linalg

from clic.config import ProbeConfig
from clic.evaluation.icnet import channel_moments, fit_icnet
from clic.models.heads import Head, LinearHead

DEFAULT_ALPHAS = tuple(10.0 ** k for k in range(-3, 6))


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-8] = 1.0
    return mean, scale


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """Balanced random fold assignment 0..folds-1."""
    ids = np.arange(n) % folds
    np.random.default_rng(seed).shuffle(ids)
    return ids


def _ridge(gram: np.ndarray, xty: np.ndarray, sx: np.ndarray, sy: float, n: int,
           alpha: float) -> tuple[np.ndarray, float]:
    """Ridge with an unpenalised intercept from sufficient statistics: G = X'X (D, D), X'y (D,),
    column sums, sum of y, count. Returns (w, b) with pred = x @ w + b."""
    mu, ym = sx / n, sy / n
    cov = gram - n * np.outer(mu, mu)  # centred X'X
    rhs = xty - n * mu * ym  # centred X'y
    cov[np.diag_indices_from(cov)] += alpha
    w = linalg.cho_solve(linalg.cho_factor(cov, check_finite=False), rhs, check_finite=False)
    return w, float(ym - mu @ w)


def fit_ridge(x: np.ndarray, y: np.ndarray, alphas: Sequence[float] = DEFAULT_ALPHAS, folds: int = 5,
              seed: int = 0) -> LinearHead:
    """Ridge on standardised features, the penalty picked by k-fold CV on (x, y) only, refit on all.

    Standardisation uses the features of (x) alone (no labels). One Gram matrix is computed and
    each fold's training statistics are obtained by subtracting the held-out fold's, so the cost
    is one (N x D) x (D x N) product plus a Cholesky per (fold, penalty).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2:
        raise ValueError(f"ridge probe needs at least 2 training samples, got {len(x)}")
    mean, scale = _standardise(x)
    xs = (x - mean) / scale  # (N, D)
    gram, xty, sx, sy = xs.T @ xs, xs.T @ y, xs.sum(0), float(y.sum())
    folds = max(2, min(folds, len(x)))
    ids = fold_ids(len(x), folds, seed)
    errors = np.zeros(len(alphas))
    for f in range(folds):
        va = ids == f
        xv, yv = xs[va], y[va]
        stats_tr = (gram - xv.T @ xv, xty - xv.T @ yv, sx - xv.sum(0), sy - float(yv.sum()), int((~va).sum()))
        for j, alpha in enumerate(alphas):
            w, b = _ridge(*stats_tr, alpha=alpha)
            errors[j] += float(np.sum((xv @ w + b - yv) ** 2))
    alpha = float(alphas[int(np.argmin(errors))])
    w, b = _ridge(gram, xty, sx, sy, len(x), alpha)
    return LinearHead(mean, scale, w, np.asarray(b), alpha)


def _train_linear(head: torch.nn.Linear, n: int, loss_of: Callable[[torch.Tensor], torch.Tensor], epochs: int,
                  lr: float, weight_decay: float, batch_size: int, seed: int) -> None:
    """SGD with momentum 0.9 and a cosine schedule over ``epochs`` shuffled passes of ``n`` samples;
    ``loss_of(idx)`` is the loss of the mini-batch of sample indices ``idx`` (B,)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch_size):
            loss = loss_of(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()


def fit_sgd(x: np.ndarray, y: np.ndarray, epochs: int = 100, lr: float = 0.01, weight_decay: float = 0.0,
            batch_size: int = 256, seed: int = 0) -> LinearHead:
    """A linear head trained with SGD + momentum on MSE over standardised frozen features."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mean, scale = _standardise(x)
    xt = torch.from_numpy((x - mean) / scale).float()
    yt = torch.from_numpy(y).float()
    head = torch.nn.Linear(x.shape[1], 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.constant_(head.bias, float(y.mean()))
    _train_linear(head, len(xt), lambda idx: torch.nn.functional.mse_loss(head(xt[idx]).squeeze(1), yt[idx]),
                  epochs, lr, weight_decay, batch_size, seed)
    return LinearHead(mean, scale, head.weight.detach().double().numpy()[0], head.bias.detach().double().numpy()[0])


def fit_regression(x: np.ndarray, y: np.ndarray, cfg: ProbeConfig, seed: int = 0, x_aug: np.ndarray | None = None,
                   device: str | torch.device = "cpu", folds: int = 0) -> Head:
    """The ``cfg.protocol`` head on (N, D) pooled features (ridge, sgd) or (N, D, h, w) maps (icnet);
    ``folds`` (default ``cfg.folds``) of ridge's penalty search. ``x_aug``: training-only features
    of augmented images (flipped), row-aligned with ``x``; icnet only."""
    if cfg.protocol == "ridge":
        return fit_ridge(x, y, cfg.alphas, folds or cfg.folds, seed)
    if cfg.protocol == "sgd":
        return fit_sgd(x, y, cfg.sgd_epochs, cfg.sgd_lr, seed=seed)
    if cfg.protocol == "icnet":
        return fit_icnet(x, y, cfg.icnet, seed, x_aug, device)
    raise ValueError(f"probe.protocol: expected ridge, sgd or icnet, got {cfg.protocol!r}")


def cross_validated_predictions(x: np.ndarray, y: np.ndarray, groups: Sequence[str] | None = None,
                                folds: int = 5, seed: int = 0, x_aug: np.ndarray | None = None,
                                cfg: ProbeConfig | None = None, device: str | torch.device = "cpu") -> np.ndarray:
    """Out-of-fold predictions: k-fold inside each group (e.g. category), the ``cfg`` head (ridge by
    default; its penalty by nested CV) fitted on the other folds of that group only (``x_aug`` rows too)."""
    x, y, cfg = np.asarray(x), np.asarray(y, np.float64), cfg or ProbeConfig()
    groups_arr = np.asarray(groups if groups is not None else [""] * len(x))
    pred = np.empty(len(x))
    for gname in sorted(set(groups_arr.tolist())):
        members = np.flatnonzero(groups_arr == gname)
        ids = fold_ids(len(members), min(folds, len(members)), seed)
        for f in range(ids.max() + 1):
            tr, te = members[ids != f], members[ids == f]
            aug = x_aug[tr] if x_aug is not None else None
            pred[te] = fit_regression(x[tr], y[tr], cfg, seed, aug, device, folds).predict(x[te])
    return pred


def fit_classifier(x: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int = 50, lr: float = 0.1,
                   weight_decay: float = 1e-4, batch_size: int = 1024, seed: int = 0) -> LinearHead:
    """Softmax regression on standardised features, trained in mini-batches (x may be a memmap)."""
    mean, scale = channel_moments(x, chunk=65536)
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        head = torch.nn.Linear(x.shape[1], num_classes)
    m, sc = torch.from_numpy(mean).float(), torch.from_numpy(scale).float()
    y = torch.from_numpy(np.asarray(labels)).long()

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        order = np.sort(idx.numpy())  # sorted reads are sequential on a memmap
        xb = (torch.from_numpy(np.asarray(x[order], np.float32)) - m) / sc
        return torch.nn.functional.cross_entropy(head(xb), y[order])

    _train_linear(head, len(x), loss_of, epochs, lr, weight_decay, batch_size, seed)
    return LinearHead(mean, scale, head.weight.detach().double().numpy().T, head.bias.detach().double().numpy())


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1)[:, :k]
    return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))
