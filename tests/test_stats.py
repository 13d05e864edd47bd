"""Paired statistics: McNemar, paired bootstrap, permutation test, Holm, retention."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest, permutation_test
from sklearn.metrics import f1_score

from loracombench import stats
from loracombench.tasks import ReportMetric


def outcomes(first_only: int, second_only: int, both: int = 3, neither: int = 2):
    """Paired 0/1 outcomes with the given discordant counts."""
    first = [1] * first_only + [0] * second_only + [1] * both + [0] * neither
    second = [0] * first_only + [1] * second_only + [1] * both + [0] * neither
    return first, second


@pytest.mark.parametrize("first_only,second_only", [(0, 0), (5, 1), (1, 5), (0, 8), (3, 3), (7, 2), (12, 30)])
def test_mcnemar_is_the_two_sided_binomial_test_on_discordant_pairs(first_only, second_only):
    result = stats.mcnemar_exact(*outcomes(first_only, second_only))
    assert (result["first_only"], result["second_only"]) == (first_only, second_only)
    expected = binomtest(first_only, first_only + second_only, 0.5).pvalue if first_only + second_only else 1.0
    assert result["p"] == pytest.approx(expected, rel=1e-12)


def test_mcnemar_hand_computed_table():
    # 5 discordant pairs favour the first model, 1 the second: p = 2 (C(6,0) + C(6,1)) / 2^6.
    assert stats.mcnemar_exact(*outcomes(5, 1))["p"] == pytest.approx(14 / 64)
    # Concordant pairs carry no information: adding them changes nothing.
    assert stats.mcnemar_exact(*outcomes(5, 1, both=40, neither=40))["p"] == pytest.approx(14 / 64)
    with pytest.raises(ValueError, match="equal lengths"):
        stats.mcnemar_exact([1, 0], [1])


def test_macro_f1_matches_sklearn_with_batches_and_weights():
    rng = np.random.default_rng(3)
    gold, predicted = rng.integers(0, 4, 40), rng.integers(0, 3, 40)  # class 3 never predicted

    def sk(g, p):
        return f1_score(g, p, labels=range(4), average="macro", zero_division=0)

    assert stats.macro_f1(gold, predicted, 4) == pytest.approx(sk(gold, predicted))
    batch = np.stack([predicted, gold, (gold + 1) % 4])
    assert stats.macro_f1(gold, batch, 4) == pytest.approx([sk(gold, p) for p in batch])
    counts = rng.integers(0, 3, (2, 40))
    for weights in counts:  # a weight is how often the example is drawn
        repeated = np.repeat(np.arange(40), weights)
        assert stats.macro_f1(gold, predicted, 4, weights) == pytest.approx(sk(gold[repeated], predicted[repeated]))
    with pytest.raises(ValueError, match="0..3"):
        stats.macro_f1(gold, predicted + 2, 4)


def test_the_reported_macro_f1_interval_is_sklearn_on_each_resample():
    from loracombench import metrics

    rng = np.random.default_rng(5)
    gold, predicted = rng.integers(0, 4, 60), rng.integers(0, 4, 60)
    reported = metrics.classification_metrics(gold.tolist(), predicted.tolist(), ["a", "b", "c", "d"])["macro_f1"]
    idx = np.random.default_rng(0).integers(0, 60, (1000, 60))  # bootstrap_statistic's draws (seed 0)
    draws = [f1_score(gold[i], predicted[i], labels=range(4), average="macro", zero_division=0) for i in idx]
    assert reported["value"] == pytest.approx(f1_score(gold, predicted, labels=range(4), average="macro"))
    assert [reported["ci_low"], reported["ci_high"]] == pytest.approx(np.percentile(draws, [2.5, 97.5]))


def test_paired_bootstrap_of_a_constant_difference_is_degenerate_at_it():
    values = np.random.default_rng(0).normal(size=30)
    result = stats.bootstrap_difference(stats.mean_score(values + 0.25), stats.mean_score(values), 30)
    assert result["value"] == pytest.approx(0.25)
    assert result["ci_low"] == pytest.approx(0.25) and result["ci_high"] == pytest.approx(0.25)
    # The same for a corpus statistic: identical predictions differ by exactly zero in every resample.
    gold = np.arange(30) % 4
    predicted = (gold + (np.arange(30) % 3 == 0)) % 4
    same = stats.compare_paired("macro_f1", predicted, predicted, gold=gold, n_classes=4)
    assert (same["value"], same["ci_low"], same["ci_high"], same["p"]) == (0.0, 0.0, 0.0, 1.0)


def test_paired_bootstrap_resamples_examples_jointly():
    # Two examples with differences 0 and 1: resampled means are 0, 1/2, 1 with probabilities
    # 1/4, 1/2, 1/4, so the 95% interval spans [0, 1]. Resampling the two models independently
    # would instead give differences down to -1 (first 0,0 against second 1,1).
    first, second = np.array([5.0, 7.0]), np.array([5.0, 6.0])
    result = stats.bootstrap_difference(stats.mean_score(first), stats.mean_score(second), 2)
    assert result["value"] == 0.5 and (result["ci_low"], result["ci_high"]) == (0.0, 1.0)


def test_bootstrap_is_seeded():
    values = np.random.default_rng(1).normal(size=50)
    once = stats.compare_paired("mean", values, values[::-1], seed=7)
    assert once == stats.compare_paired("mean", values, values[::-1], seed=7)
    assert once["ci_low"] != stats.compare_paired("mean", values, values[::-1], seed=8)["ci_low"]


def test_non_finite_outputs_have_no_permutation_p_and_no_tested_difference():
    first, second = np.linspace(0, 1, 20), np.r_[np.linspace(0, 1, 19), np.nan]
    assert np.isnan(stats.permutation_p_value(lambda v: v.mean(-1), first, second))
    compared = stats.compare_paired("mean", first, second)
    assert compared["value"] is None and compared["p"] is None


def test_permutation_test_enumerates_swaps_exactly_on_small_samples():
    # Five examples, the first model better by 1 on each: of the 2^5 swap patterns only "none"
    # and "all" reach |mean difference| = 1, so p = 2/32.
    first, second = np.arange(5.0) + 1, np.arange(5.0)
    assert stats.compare_paired("mean", first, second)["p"] == pytest.approx(2 / 32)
    assert stats.compare_paired("mean", first, first)["p"] == 1.0


@pytest.mark.parametrize("n,tolerance", [(9, 1e-12), (60, 0.02)])
def test_permutation_test_agrees_with_scipy(n, tolerance):
    # n = 9: both enumerate all 512 swap patterns and must agree exactly; n = 60: both sample.
    rng = np.random.default_rng(n)
    first = rng.normal(size=n)
    second = first - 0.3 + rng.normal(scale=0.8, size=n)
    ours = stats.permutation_p_value(lambda x: x.mean(axis=-1), first, second, resamples=9999)
    theirs = permutation_test((first, second), lambda x, y, axis: x.mean(axis) - y.mean(axis),
                              permutation_type="samples", vectorized=True, n_resamples=9999,
                              rng=np.random.default_rng(1)).pvalue
    assert 0.001 < theirs < 0.9 and ours == pytest.approx(theirs, abs=tolerance)


def test_permutation_test_of_macro_f1_keeps_each_example_with_its_gold():
    gold = np.arange(6) % 3
    right, wrong = gold, (gold + 1) % 3
    result = stats.compare_paired("macro_f1", right, wrong, gold=gold, n_classes=3)
    assert result["value"] == pytest.approx(1.0) and result["test"] == "paired permutation"
    # Only swapping none or all of the six examples gives |difference| = 1.
    assert result["p"] == pytest.approx(2 / 64)


def test_binary_comparison_uses_mcnemar_and_the_difference_of_accuracies():
    first, second = outcomes(0, 8)
    result = stats.compare_paired("binary", first, second)
    assert result["test"] == "McNemar exact" and result["p"] == pytest.approx(2 / 256)
    assert result["value"] == pytest.approx(-8 / len(first))
    assert result["ci_low"] <= result["value"] <= result["ci_high"] < 0


def test_holm_hand_computed():
    # Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → raised to 0.06 (step-down).
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([None, 0.2, 0.5]) == [None, pytest.approx(0.4), pytest.approx(0.5)]
    assert stats.holm([0.6, 0.7]) == [1.0, 1.0]
    assert stats.holm([0.01]) == [0.01] and stats.holm([]) == []


def test_retention_is_the_share_of_the_experts_gain_in_either_direction():
    base = np.linspace(2.0, 3.0, 20)  # NLL: lower is better
    expert, model = base - 1.0, base - 0.5
    result = stats.retention(*(stats.mean_score(v) for v in (model, base, expert)), 20, higher_is_better=False)
    # Every resample keeps the ratio of the two gains, so the interval collapses onto it.
    assert (result["value"], result["ci_low"], result["ci_high"]) == pytest.approx((0.5, 0.5, 0.5))
    accuracy = [stats.mean_score(v) for v in ([1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0])]
    assert stats.retention(*accuracy, 5)["value"] == pytest.approx(0.5)


def test_retention_is_undefined_when_the_expert_equals_the_base():
    same = [1, 0, 1, 0]
    result = stats.retention(stats.mean_score([1, 1, 1, 0]), stats.mean_score(same), stats.mean_score(same), 4)
    assert result["value"] is None and result["ci_low"] is None and result["ci_high"] is None


def test_retention_is_undefined_when_the_expert_is_worse_than_the_base():
    """A model worse than both would otherwise keep "twice the expert's gain"."""
    base, expert, model = ([1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0])
    assert stats.retention(*(stats.mean_score(v) for v in (model, base, expert)), 6)["value"] is None
    nll = [stats.mean_score(np.array(v, dtype=float)) for v in ([3, 3], [1, 1], [2, 2])]  # the NLL expert is worse
    assert stats.retention(*nll, 2, higher_is_better=False)["value"] is None
    assert stats.retention(*nll, 2, higher_is_better=True)["value"] == pytest.approx(2.0)  # read the other way


def test_retention_leaves_out_resamples_where_it_is_undefined():
    # The expert gains on one example of four: resamples without it have no gain to share.
    result = stats.retention(*(stats.mean_score(v) for v in ([0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 1])), 4)
    assert result["value"] == 1.0 and (result["ci_low"], result["ci_high"]) == (1.0, 1.0)
    assert 0 < result["undefined_resamples"] < stats.RESAMPLES


def test_unknown_comparisons_are_rejected_with_the_valid_ones():
    with pytest.raises(ValueError, match="valid: binary, mean, macro_f1"):
        stats.compare_paired("median", [1.0], [2.0])
    with pytest.raises(ValueError, match="valid: binary, mean, macro_f1"):
        ReportMetric("x", "X", True, "median", field="x")
    with pytest.raises(ValueError, match="needs n_classes"):
        ReportMetric("f1", "F1", True, "macro_f1")
    with pytest.raises(ValueError, match="needs the per-example field"):
        ReportMetric("acc", "Acc", True, "binary")


def test_grid_share_counts_the_points_at_least_as_good_in_either_direction():
    losses = [0.5, 0.7, 0.7, 0.9]
    assert stats.grid_share(0.7, losses, higher_is_better=False) == 3 / 4  # ties count as at least as good
    assert stats.grid_share(0.4, losses, higher_is_better=False) == 0.0  # better than every point
    assert stats.grid_share(0.7, losses, higher_is_better=True) == 3 / 4
    assert stats.grid_share(1.0, losses, higher_is_better=True) == 0.0
    assert stats.grid_share(0.1, losses, higher_is_better=True) == 1.0
