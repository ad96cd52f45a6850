"""clic: unsupervised image-complexity representation (CLIC and CLICv2)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from clic.scorer import Scorer


def load_scorer(path_or_uri: str, device: str | None = None) -> Scorer:
    """``clic.load_scorer(path_or_uri)(images) -> scores``; see :func:`clic.scorer.load_scorer`."""
    from clic.scorer import load_scorer as _load

    return _load(path_or_uri, device)


def __getattr__(name: str) -> Any:  # lazy: importing clic stays cheap
    if name == "Scorer":
        from clic.scorer import Scorer

        return Scorer
    raise AttributeError(name)
