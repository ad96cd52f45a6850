"""The methods, one module each, registered by name: :mod:`~clic.methods.moco` (MoCo v2),
:mod:`~clic.methods.clic` (CLIC), :mod:`~clic.methods.clicv2` (CLICv2). A new method is one more
module here (a :class:`Method` subclass with :func:`register`) and its section in params.yaml."""

from clic.methods import clic, clicv2, moco  # noqa: F401  (registers them, in this order)
from clic.methods.base import REGISTRY, Method, get, names, register

__all__ = ["REGISTRY", "Method", "get", "names", "register"]
