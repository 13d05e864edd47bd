"""Merging LoRA adapters: a registry of merge methods and merge_modules to apply one.

Every method merges one module at a time from its adapters' LoraFactors (see factors.py);
importing this package registers them all. diagnostics.py measures how two or more adapters
interfere (cosine, sign conflicts, the cross terms of factor averaging).
"""

from loracombench.merging.registry import (
    METHODS,
    MergeError,
    MergeMethod,
    Param,
    get_method,
    parse_params,
    register,
)

# Imported for their side effect: each module registers its method(s).
from loracombench.merging import (  # noqa: E402,F401  isort: skip
    average,
    task_arithmetic,
    svd,
    ties,
    dare,
    magnitude_prune,
    knots,
    tucker,
    tsv,
    iso,
    core_space,
)
from loracombench.merging.merge import merge_modules

__all__ = ["MergeError", "Param", "MergeMethod", "METHODS", "register", "get_method", "parse_params",
           "merge_modules"]
