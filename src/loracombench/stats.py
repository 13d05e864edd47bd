"""Paired statistics for models scored on the same examples: tests, intervals, Holm, retention.

Pure functions, no I/O, deterministic for a given seed. Every model of a run answers the same
examples, so differences are judged example by example (paired), which is far more sensitive
than comparing two marginal intervals.

- Binary outcomes (accuracy, exact match): exact McNemar test (McNemar 1947), i.e. a two-sided
  binomial test on the discordant examples.
- Per-example values (NLL) and corpus statistics (macro-F1): a paired permutation test
  (randomisation test, Noreen 1989; recommended for NLP by Riezler & Maxwell 2005 and Dror et al.
  2018). Under the null hypothesis "the two models are interchangeable on every example" swapping
  their two outputs on any example leaves the distribution unchanged, so the test is exact (up
  to Monte Carlo error; all 2^n swaps are enumerated when they are fewer than the resamples)
  and needs no assumption about the statistic's distribution. A bootstrap p-value would need the
  bootstrap distribution shifted to the null, which is anti-conservative on small samples.
- Intervals of a difference (and of retention): paired percentile bootstrap (Efron & Tibshirani
  1993) that resamples example indices jointly for all models involved, so their correlation
  is kept.
- Several comparisons: Holm's step-down adjustment (Holm 1979), which controls the family-wise
  error rate without assumptions on how the tests depend on each other.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import stats as scipy_stats

RESAMPLES = 2000
PERMUTATIONS = 9999
# Upper bound on resampled cells held at once (resamples x examples), to bound memory.
_CHUNK_CELLS = 2_000_000

# A score of one model as a function of bootstrap weights: (resamples, n) counts -> (resamples,).
WeightedScore = Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------- scores

def mean_score(values) -> WeightedScore:
    values = np.asarray(values, dtype=float)
    return lambda weights: weights @ values / weights.sum(axis=-1)


def macro_f1(gold, predicted, n_classes: int, weights=None) -> np.ndarray:
    """Macro-F1 over classes 0..n_classes-1, as sklearn's f1_score(average="macro",
    zero_division=0) with labels=range(n_classes). `predicted` may carry leading batch axes,
    `weights` (counts per example) too; the result has those axes."""
    gold, predicted = np.asarray(gold), np.asarray(predicted)
    for name, labels in (("gold", gold), ("predicted", predicted)):
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(f"{name} labels must lie in 0..{n_classes - 1}, got {labels.min()}..{labels.max()}")
    codes = gold * n_classes + predicted
    if weights is not None:
        codes, weights = np.broadcast_arrays(codes, np.asarray(weights, dtype=float))
        weights = weights.ravel()
    batch, n = codes.shape[:-1], codes.shape[-1]
    rows, cells = int(np.prod(batch)), n_classes * n_classes
    flat = (codes.reshape(rows, n) + cells * np.arange(rows)[:, None]).ravel()
    confusion = np.bincount(flat, weights=weights, minlength=rows * cells).reshape(rows, n_classes, n_classes)
    true_positive = np.diagonal(confusion, axis1=1, axis2=2)
    denominator = confusion.sum(axis=1) + confusion.sum(axis=2)  # gold + predicted counts per class
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros(denominator.shape), where=denominator > 0)
    return f1.mean(axis=1).reshape(batch)[()]


def macro_f1_score(gold, predicted, n_classes: int) -> WeightedScore:
    return lambda weights: macro_f1(gold, predicted, n_classes, weights)


# ---------------------------------------------------------------- bootstrap

def _bootstrap_weights(n: int, resamples: int, seed: int):
    """Resampled example counts, (chunk, n) at a time: row r counts how often each example is drawn."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // max(n, 1))
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        draws = rng.integers(0, n, (rows, n)) + n * np.arange(rows)[:, None]
        yield np.bincount(draws.ravel(), minlength=rows * n).reshape(rows, n).astype(float)


def paired_bootstrap(scores: Sequence[WeightedScore], combine, n: int, *, seed: int = 0,
                     resamples: int = RESAMPLES) -> dict:
    """combine(score_1, ..., score_k) with a percentile 95% interval, resampling the n examples
    jointly for every score. combine returns NaN where it is undefined: an undefined point value
    gives None throughout, undefined resamples are left out (their count is returned)."""
    if n <= 0:
        raise ValueError("a paired bootstrap needs at least one example")
    whole = np.ones((1, n))
    value = float(combine(*[score(whole) for score in scores])[0])
    draws = np.concatenate([combine(*[score(w) for score in scores])
                            for w in _bootstrap_weights(n, resamples, seed)])
    defined = draws[np.isfinite(draws)]
    if not np.isfinite(value) or defined.size == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": n, "interval": "paired bootstrap95",
                "undefined_resamples": int(draws.size - defined.size)}
    low, high = np.percentile(defined, [2.5, 97.5])
    undefined = int(draws.size - defined.size)
    # The interval then describes only the resamples where the value exists: say so where it is read.
    interval = "paired bootstrap95" + (f" over {defined.size} of {draws.size} resamples (the rest undefined)"
                                       if undefined else "")
    return {"value": value, "ci_low": float(low), "ci_high": float(high), "n": n,
            "interval": interval, "undefined_resamples": undefined}


def bootstrap_difference(first: WeightedScore, second: WeightedScore, n: int, *, seed: int = 0,
                         resamples: int = RESAMPLES) -> dict:
    """first − second on the same n examples, with a paired-bootstrap 95% interval."""
    return paired_bootstrap([first, second], np.subtract, n, seed=seed, resamples=resamples)


def gain(base, improved, higher_is_better: bool):
    """How much `improved` betters `base`, in the score's own direction. Retention is the ratio of
    two such gains, defined only where the expert's is positive (stats.retention and the weight
    sweep's objective both read it from here)."""
    return improved - base if higher_is_better else base - improved


def _ratio_of_gains(model, base, expert, higher_is_better: bool):
    expert_gain = gain(base, expert, higher_is_better)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(expert_gain > 0,
                        gain(base, model, higher_is_better) / np.where(expert_gain > 0, expert_gain, 1.0), np.nan)


def retention(model: WeightedScore, base: WeightedScore, expert: WeightedScore, n: int, *,
              higher_is_better: bool = True, seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """(model − base) / (expert − base) with a paired-bootstrap 95% interval over the n examples
    all three answered: the share of the expert's gain over the base that the model keeps. For a
    lower-is-better score (NLL) the gains are base − model and base − expert. Undefined (value
    None; a resample left out) where the expert gains nothing: it equals the base or is worse,
    where the ratio would read a model worse than both as keeping more than all of a gain."""
    return paired_bootstrap([model, base, expert], lambda m, b, e: _ratio_of_gains(m, b, e, higher_is_better), n,
                            seed=seed, resamples=resamples)


# ---------------------------------------------------------------- tests

def mcnemar_exact(first, second) -> dict:
    """Exact two-sided McNemar test on paired 0/1 outcomes: under the null each discordant
    example is equally likely to favour either model, so the count favouring the first is
    Binomial(discordant, 1/2); p = min(1, 2·P(X ≤ min(b, c)))."""
    first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if first.shape != second.shape:
        raise ValueError(f"paired outcomes need equal lengths, got {first.size} and {second.size}")
    first_only, second_only = int(np.sum(first & ~second)), int(np.sum(~first & second))
    discordant = first_only + second_only
    p = 1.0 if discordant == 0 else min(1.0, 2 * float(scipy_stats.binom.cdf(min(first_only, second_only),
                                                                                 discordant, 0.5)))
    return {"first_only": first_only, "second_only": second_only, "p": p}


def _swap_masks(n: int, resamples: int, seed: int):
    """Which examples swap their two outputs, (chunk, n) at a time: all 2^n patterns when there
    are no more than `resamples` of them (the exact test), else `resamples` random patterns."""
    exact = n < 63 and 2 ** n <= resamples
    total = 2 ** n if exact else resamples
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // n)
    for start in range(0, total, chunk):
        rows = min(chunk, total - start)
        if exact:
            yield (np.arange(start, start + rows)[:, None] >> np.arange(n)) & 1 == 1
        else:
            yield rng.random((rows, n)) < 0.5


def permutation_p_value(statistic, first, second, *, seed: int = 0, resamples: int = PERMUTATIONS) -> float:
    """Two-sided paired permutation test of statistic(first) − statistic(second): each resample
    swaps the two models' outputs on a subset of examples; p is the share of resamples at least
    as extreme as observed, counting the observed one (Phipson & Smyth 2010) unless all 2^n
    subsets are enumerated. statistic(outputs) must reduce the last axis of outputs shaped (..., n).

    The same test as scipy.stats.permutation_test(permutation_type="samples") (checked in the
    tests), written out because scipy's generic pairing generator costs ~0.2 s per test at
    n = 200, and a three-seed report runs about 150 of them."""
    first, second = np.asarray(first), np.asarray(second)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(f"paired outputs need equal 1-d shapes, got {first.shape} and {second.shape}")
    if not (np.all(np.isfinite(first)) and np.all(np.isfinite(second))):
        return float("nan")  # NaN compares as never extreme, which would read as p = 1/(resamples+1)
    if np.array_equal(first, second):
        return 1.0  # every swap gives the observed statistic
    observed = abs(float(statistic(first) - statistic(second)))
    # Swaps that reproduce the observed value up to rounding must count as extreme.
    threshold = observed - 1e-9 * max(1.0, observed)
    extreme = drawn = 0
    for swap in _swap_masks(first.size, resamples, seed):
        null = statistic(np.where(swap, second, first)) - statistic(np.where(swap, first, second))
        extreme += int(np.sum(np.abs(null) >= threshold))
        drawn += swap.shape[0]
    exact = drawn == 2 ** first.size
    return extreme / drawn if exact else (extreme + 1) / (drawn + 1)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values, in the input order; None (no test) stays None and does
    not count towards the family. Adjusted p_(i) = max over j ≤ i of min(1, (m − j + 1)·p_(j))."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


# ---------------------------------------------------------------- one registry for the report

def _mean_along_last(values):
    return np.mean(values, axis=-1)


def _compare_binary(first, second, seed):
    difference = bootstrap_difference(mean_score(first), mean_score(second), len(first), seed=seed)
    return difference, "McNemar exact", mcnemar_exact(first, second)["p"]


def _compare_mean(first, second, seed):
    first, second = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    difference = bootstrap_difference(mean_score(first), mean_score(second), len(first), seed=seed)
    return difference, "paired permutation", permutation_p_value(_mean_along_last, first, second, seed=seed)


def _compare_macro_f1(first, second, seed, gold, n_classes):
    difference = bootstrap_difference(macro_f1_score(gold, first, n_classes),
                                      macro_f1_score(gold, second, n_classes), len(first), seed=seed)
    p = permutation_p_value(lambda predicted: macro_f1(gold, predicted, n_classes), first, second, seed=seed)
    return difference, "paired permutation", p


PAIRED_COMPARISONS = {"binary": _compare_binary, "mean": _compare_mean, "macro_f1": _compare_macro_f1}


def _check_kind(kind: str) -> None:
    if kind not in PAIRED_COMPARISONS:
        raise ValueError(f"unknown paired comparison {kind!r}; valid: {', '.join(PAIRED_COMPARISONS)}")


def compare_paired(kind: str, first, second, *, gold=None, n_classes: int | None = None, seed: int = 0) -> dict:
    """first − second on the same examples: the difference with its paired-bootstrap interval,
    the test's name and its p-value. kind: "binary" (0/1 outcomes, McNemar), "mean" (per-example
    values, permutation test) or "macro_f1" (predicted labels against `gold`, permutation test)."""
    _check_kind(kind)
    if len(first) != len(second) or len(first) == 0:
        raise ValueError(f"paired outputs need equal, non-zero lengths, got {len(first)} and {len(second)}")
    extra = {"gold": np.asarray(gold), "n_classes": n_classes} if kind == "macro_f1" else {}
    difference, test, p = PAIRED_COMPARISONS[kind](np.asarray(first), np.asarray(second), seed, **extra)
    # An undefined difference (a diverged model's NaN or infinite NLL) has nothing to test.
    return {**difference, "test": test, "p": p if difference["value"] is not None else None}


def score_of(kind: str, outputs, *, gold=None, n_classes: int | None = None) -> WeightedScore:
    """The weighted score a paired comparison of this kind compares (for retention)."""
    _check_kind(kind)
    if kind == "macro_f1":
        return macro_f1_score(np.asarray(gold), np.asarray(outputs), n_classes)
    return mean_score(np.asarray(outputs, dtype=float))


def grid_share(value: float, points: Sequence[float], higher_is_better: bool) -> float:
    """The share of a grid's points at least as good as `value`: a grid rank, 0 when the value is
    better than every point and at most 0.1 within the grid's best 10%."""
    at_least_as_good = [p >= value if higher_is_better else p <= value for p in points]
    return sum(at_least_as_good) / len(at_least_as_good)
