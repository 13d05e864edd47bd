"""Interference diagnostics between adapters, and their plot."""

from __future__ import annotations

import math

import pytest
import torch

from loracombench.merging import MergeError, merge_modules
from loracombench.merging.diagnostics import diagnose, plot_diagnostics
from loracombench.merging.factors import LoraFactors


def factors(rank: int = 3, in_features: int = 6, out_features: int = 5, scale: float = 2.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(rank, in_features, generator=generator),
                       torch.randn(out_features, rank, generator=generator), scale)


def negated(adapter: LoraFactors) -> LoraFactors:
    return LoraFactors(-adapter.lora_A, adapter.lora_B, adapter.scale)


def test_an_adapter_agrees_with_itself():
    adapter = factors()
    result = diagnose({"m": [adapter, adapter]})
    for scope in (result["modules"]["m"], result["overall"]):
        assert scope["cosine"]["0-1"] == pytest.approx(1.0)
        assert scope["sign_conflict"]["0-1"] == 0.0
        assert scope["norm_ratio"]["0-1"] == pytest.approx(1.0)
    # own terms B A + B A, cross terms B A + B A: as large as each other.
    assert result["overall"]["cross_term_ratio"] == pytest.approx(1.0)


def test_an_adapter_and_its_negation_conflict_everywhere():
    adapter = factors()
    result = diagnose({"m": [adapter, negated(adapter)]})["modules"]["m"]
    assert result["cosine"]["0-1"] == pytest.approx(-1.0)
    assert result["sign_conflict"]["0-1"] == 1.0


def test_norm_ratio_follows_the_scales():
    adapter = factors(scale=3.0)
    half = LoraFactors(adapter.lora_A, adapter.lora_B, 1.5)
    assert diagnose({"m": [adapter, half]})["overall"]["norm_ratio"]["0-1"] == pytest.approx(2.0)


def test_sign_conflict_counts_only_entries_where_both_are_nonzero():
    # ΔW₁ = [1, -1, 0, 2], ΔW₂ = [-1, -1, 3, -2]: opposite signs at entries 0 and 3 only.
    first = LoraFactors(torch.tensor([[1.0, -1.0, 0.0, 2.0]]), torch.ones(1, 1))
    second = LoraFactors(torch.tensor([[-1.0, -1.0, 3.0, -2.0]]), torch.ones(1, 1))
    assert diagnose({"m": [first, second]})["overall"]["sign_conflict"]["0-1"] == 0.5


def test_cross_term_ratio_of_orthogonal_factors_matches_the_hand_value():
    # B₁ = 1·e₁, A₁ = e₁ᵀ; B₂ = 2·e₂, A₂ = 3·e₂ᵀ (scales 1).
    # own = B₁A₁ + B₂A₂ = E₁₁ + 6E₂₂, norm √37; cross = B₁A₂ + B₂A₁ = 3E₁₂ + 2E₂₁, norm √13.
    e1, e2 = torch.tensor([[1.0], [0.0], [0.0]]), torch.tensor([[0.0], [1.0], [0.0]])
    first = LoraFactors(e1.T.clone(), 1.0 * e1, 1.0)
    second = LoraFactors(3.0 * e2.T, 2.0 * e2, 1.0)
    result = diagnose({"m": [first, second]})
    assert result["modules"]["m"]["cross_term_ratio"] == pytest.approx(math.sqrt(13 / 37))
    assert result["modules"]["m"]["cosine"]["0-1"] == pytest.approx(0.0)


def test_cross_terms_are_what_factor_averaging_adds():
    adapters = [factors(scale=2.0, seed=1), factors(scale=0.5, seed=2), factors(scale=1.0, seed=3)]
    ratio = diagnose({"m": adapters})["overall"]["cross_term_ratio"]
    merged, _ = merge_modules("average", {"m": adapters})
    own = sum(f.delta_weight() for f in adapters)
    cross = 9 * merged["m"].delta_weight() - own  # n² · mean(B)·mean(A) = own + cross
    assert ratio == pytest.approx(float(torch.linalg.norm(cross) / torch.linalg.norm(own)), rel=1e-5)


def test_overall_pools_all_modules_as_one_flattened_vector():
    q = [factors(seed=4), factors(seed=5)]
    v = [factors(out_features=2, seed=6), factors(out_features=2, seed=7)]
    result = diagnose({"q": q, "v": v})
    flat = [torch.cat([q[i].delta_weight().reshape(-1), v[i].delta_weight().reshape(-1)]) for i in range(2)]
    cosine = float(flat[0] @ flat[1] / (flat[0].norm() * flat[1].norm()))
    assert result["overall"]["cosine"]["0-1"] == pytest.approx(cosine, rel=1e-5)
    assert result["overall"]["norm_ratio"]["0-1"] == pytest.approx(float(flat[0].norm() / flat[1].norm()), rel=1e-5)
    conflicts = float(((flat[0] * flat[1]) < 0).float().mean())
    assert result["overall"]["sign_conflict"]["0-1"] == pytest.approx(conflicts)


def test_every_pair_of_three_adapters_is_reported():
    adapter = factors()
    result = diagnose({"m": [adapter, adapter, negated(adapter)]})
    assert result["pairs"] == ["0-1", "0-2", "1-2"]
    assert result["overall"]["cosine"] == pytest.approx({"0-1": 1.0, "0-2": -1.0, "1-2": -1.0})


def test_incomplete_modules_and_unequal_ranks():
    result = diagnose({"q": [factors(rank=2), factors(rank=3, seed=1)], "v": [factors(), None]})
    assert result["skipped_modules"] == ["v"] and list(result["modules"]) == ["q"]
    assert result["modules"]["q"]["cross_term_ratio"] is None
    assert result["overall"]["cross_term_ratio"] is None


def test_bad_input_is_rejected():
    with pytest.raises(MergeError, match="at least 2"):
        diagnose({"m": [factors()]})
    broken = LoraFactors(factors().lora_A, factors().lora_B, math.inf)
    with pytest.raises(MergeError, match="NaN or Inf"):
        diagnose({"m": [factors(), broken]})
    with pytest.raises(MergeError, match="disagree"):
        diagnose({"m": [factors(), factors(in_features=7)]})


def test_plot_writes_a_png_atomically(tmp_path, monkeypatch):
    import matplotlib.figure

    result = diagnose({f"layers.{i}.q_proj": [factors(seed=i), factors(seed=i + 10)] for i in range(4)})
    target = tmp_path / "diagnostics.png"
    target.write_bytes(b"old")
    plot_diagnostics(result, target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["diagnostics.png"]
    # A save that dies halfway leaves the earlier plot whole and no temporary behind.
    target.write_bytes(b"old")

    def dies_halfway(figure, file, **kwargs):
        open(file, "wb").write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        plot_diagnostics(result, target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["diagnostics.png"]
