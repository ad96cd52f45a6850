"""clic: unsupervised image-complexity representation (CLIC and CLICv2).

``clic.load_scorer(path_or_uri)(images) -> scores``: see :func:`clic.scorer.load_scorer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from clic.scorer import Scorer as Scorer
    from clic.scorer import load_scorer as load_scorer


def __getattr__(name: str) -> Any:  # lazy: importing clic stays cheap
    if name in ("Scorer", "load_scorer"):
        from clic import scorer

        return getattr(scorer, name)
    raise AttributeError(name)
