"""mcwt_ext: Monte Carlo Winning Tickets (Grzeszczuk & Kurdziel) for PyTorch.

Fit a logistic keep-probability to one genuine winning ticket, then sample new
tickets layer by layer with fused C++/CUDA kernels::

    from mcwt_ext import sample_masks
    masks = sample_masks(model, "fit.json", data, sparsity=0.8, seed=0)

The compiled ops (``mcwt_ext.ops``) load lazily, so the pure-PyTorch modules
(models, data, train, imp) import without them; a failed load of the
extension is never swallowed, it raises on first use.
"""
import importlib

from ._version import __version__  # noqa: F401

# Public names and the submodule that defines each; resolved on first access.
_LAZY = {
    "sample_masks": "mcwt_ext.sample",
    "overlap_with_ticket": "mcwt_ext.compare",
    "fit_ticket": "mcwt_ext.fit",
    "LogisticFit": "mcwt_ext.fit",
    "load_fit": "mcwt_ext.fit",
    "measure_connectivity": "mcwt_ext.connectivity",
    "build_model": "mcwt_ext.models",
    "load_dataset": "mcwt_ext.data",
    "train_pack": "mcwt_ext.lockstep",
    "export_state": "mcwt_ext.state",
    "import_state": "mcwt_ext.state",
    "UsageError": "mcwt_ext.errors",
}
_SUBMODULES = {"ops", "ablate", "dst"}

# The function shadows its module of the same name, so that ``mcwt_ext.prune_at_init(...)`` is
# the function however the module was first imported (an import of the submodule after this line
# leaves the attribute alone). It needs torch only, not the compiled ops.
from .prune_at_init import prune_at_init  # noqa: E402

__all__ = sorted(_LAZY) + sorted(_SUBMODULES) + ["prune_at_init"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"mcwt_ext.{name}")
    raise AttributeError(f"module 'mcwt_ext' has no attribute {name!r}")
