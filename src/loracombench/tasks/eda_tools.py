"""What each task's data statistics and plots are built from: JSON-ready summaries, correlations
with intervals, and the figure conventions every EDA plot shares. No task here, so task modules
can import it (eda.py, which runs the tasks' hooks, imports the task registry).

Lengths in words are whitespace-separated words (`len(text.split())`).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from .. import io, metrics

WORD_UNIT = "words: whitespace-separated (len(text.split()))"
PERCENTILES = (50, 90, 95, 99)
Z95 = 1.959963984540054
SPLIT_COLOURS = {"train": "tab:blue", "validation": "tab:green", "test": "tab:orange"}
DPI = 110


# --------------------------------------------------------------------------- statistics

def word_count(text: str) -> int:
    return len(text.split())


def json_float(value) -> float | None:
    """A JSON-safe float: numpy scalars become floats, NaN and infinities become None."""
    value = float(value)
    return value if math.isfinite(value) else None


def summarize(values) -> dict:
    """n, mean, sample standard deviation, min, percentiles (numpy's linear method) and max."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("cannot summarise an empty list of values")
    summary = {"n": int(values.size), "mean": json_float(values.mean()),
               "std": json_float(values.std(ddof=1)) if values.size > 1 else 0.0,
               "min": json_float(values.min())}
    for q, value in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
        summary[f"p{q}"] = json_float(value)
    summary["max"] = json_float(values.max())
    return summary


def histogram(values) -> dict[str, int]:
    """Counts per distinct integer value, keys as strings in ascending numeric order (JSON)."""
    return {str(k): v for k, v in sorted(Counter(int(v) for v in values).items())}


def proportion(correct: int, n: int) -> dict:
    """The share correct/n with its Wilson interval, from numpy counts as well."""
    return metrics.proportion(int(correct), int(n))


def fisher_ci(r: float, n: int, method: str = "pearson") -> tuple[float | None, float | None]:
    """95% interval for a correlation by the Fisher z-transform.

    Standard error 1/sqrt(n-3) for Pearson; sqrt(1.06/(n-3)) for Spearman (Fieller, Hartley &
    Pearson 1957). Undefined (None, None) for n <= 3 or an undefined r."""
    if n <= 3 or r is None or not math.isfinite(r):
        return None, None
    if abs(r) >= 1:
        return float(r), float(r)
    se = math.sqrt((1.06 if method == "spearman" else 1.0) / (n - 3))
    z = math.atanh(r)
    return math.tanh(z - Z95 * se), math.tanh(z + Z95 * se)


def correlation(x, y) -> dict:
    """Pearson and Spearman correlations of two equally long sequences, with Fisher-z 95% CIs."""
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = int(x.size)
    out = {"n": n, "interval": "fisher_z95 (Spearman: se = sqrt(1.06/(n-3)))"}
    degenerate = n < 2 or np.ptp(x) == 0 or np.ptp(y) == 0
    for name, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        if degenerate:
            r, p = float("nan"), float("nan")
        else:
            result = fn(x, y)
            r, p = float(result.statistic), float(result.pvalue)
        low, high = fisher_ci(r, n, name)
        out[name] = {"r": json_float(r), "ci_low": low, "ci_high": high, "p_value": json_float(p)}
    return out


def format_correlation(d: dict) -> str:
    """"r [low, high]" of one entry of correlation(), "undefined" without r."""
    if d.get("r") is None:
        return "undefined"
    if d.get("ci_low") is None:
        return f"{d['r']:.3f}"
    return f"{d['r']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"


def format_proportion(d: dict) -> str:
    return f"{d['value']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"


# --------------------------------------------------------------------------- figures

def split_colour(split: str, i: int) -> str:
    return SPLIT_COLOURS.get(split, f"C{i + 3}")


def figure(nrows: int = 1, ncols: int = 1, size=(7.0, 4.5)):
    """A figure (no pyplot state) and its axes as a flat array."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def save_figure(fig, path: Path) -> Path:
    with io.atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return path


def integer_bins(values, target: int = 60) -> np.ndarray:
    """Bin edges on half-integers, about `target` bins wide enough to cover integer data."""
    values = np.asarray(values)
    low, high = int(values.min()), int(values.max())
    width = max(1, math.ceil((high - low + 1) / target))
    return np.arange(low, high + width + 1, width) - 0.5
