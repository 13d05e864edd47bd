"""The report, built from hand-written result folders: scores, paired comparisons, retention, seeds."""

from __future__ import annotations

import csv
import json
from typing import ClassVar

import numpy as np
import pytest

from loracombench import metrics, report
from loracombench.report import seeded_rows
from loracombench.tasks import TASKS, ReportMetric, Task, register

N_AG, N_GSM, N_GENERATED = 24, 10, 6
AG_GOLD = [i % 4 for i in range(N_AG)]
GSM_NLL_BASE = np.linspace(2.0, 3.0, N_GSM)


def ag_news_result(correct: set[int]) -> tuple[dict, list[dict]]:
    predicted = [g if i in correct else (g + 1) % 4 for i, g in enumerate(AG_GOLD)]
    rows = [{"index": i, "gold": g, "prediction": p, "correct": g == p, "prediction_norm": p, "correct_norm": g == p}
            for i, (g, p) in enumerate(zip(AG_GOLD, predicted))]
    result = metrics.classification_metrics(AG_GOLD, predicted, ["World", "Sports", "Business", "Technology"])
    return {**result, "accuracy_norm": result["accuracy"]}, rows


def gsm8k_result(nll_gain: float, correct: set[int]) -> tuple[dict, list[dict]]:
    rows = []
    for i, nll in enumerate(GSM_NLL_BASE - nll_gain):
        row = {"index": i, "gold": str(i), "gold_nll": float(nll)}
        if i < N_GENERATED:
            row.update(correct_flexible=i in correct, correct_strict=i in correct)
        rows.append(row)
    generated = rows[:N_GENERATED]
    return {"gold_nll": metrics.bootstrap_mean([r["gold_nll"] for r in rows]),
            "exact_match_flexible": metrics.proportion(sum(r["correct_flexible"] for r in generated), N_GENERATED),
            "exact_match_strict": metrics.proportion(sum(r["correct_strict"] for r in generated), N_GENERATED)}, rows


def write_model(run, label: str, kind: str, seed, results: dict, relative_error: float | None = None,
                sample_seed: int = 1234, base_model: dict | None = None) -> None:
    slug = label.replace(": ", "_").replace(" ", "_") + ("" if seed is None else f"_s{seed}")
    model = {"label": label, "kind": kind, "slug": slug, "seed": seed}
    if base_model is not None:
        model["base_model"] = base_model
    if relative_error is not None:
        model["relative_error"] = relative_error
    for task, (scores, rows) in results.items():
        record = metrics.result_record(task=task, split="test", n=len(rows), seed=sample_seed, model=model, metrics=scores,
                                       primary_metric=TASKS[task].primary_metric, chance=TASKS[task].chance)
        metrics.write_result(run / "eval" / slug / task, record, rows,
                             [{"text": f"example {r['index']}"} for r in rows])


def build_report(run):
    """As a finished run leaves it: every result folder written is one of its current cells."""
    report.write_current_results(run, sorted(p.parent for p in run.glob("eval/*/*/metrics.json")))
    return report.build_report(run)


def span(stop: int, start: int = 0) -> set[int]:
    return set(range(start, stop))


# AG News correct examples and GSM8K NLL gains per seed. Seed 0 is the hand-checked one:
# against the AG News expert (correct on 0..15) the average (0..11 and 20) has 1 example only it
# gets right and 4 only the expert does, McNemar p = 2·(1+5)/2^5 = 0.375; TIES (0..7) has 0 and 8,
# p = 2/2^8 = 0.0078125. Holm over the two composed models: 0.015625 for TIES, 0.375 for the average.
SEEDS = {
    0: {"ag_expert": span(16), "average": span(12) | {20}, "ties": span(8), "gsm_gain": (1.0, 0.5, 0.2)},
    1: {"ag_expert": span(18), "average": span(14), "ties": span(10), "gsm_gain": (0.8, 0.6, 0.4)},
}
TIES_ERROR = {0: 0.12, 1: 0.10}


def write_run(run, seeds=(0, 1)) -> None:
    base_ag = span(6)
    write_model(run, "base", "base", None, {"ag_news": ag_news_result(base_ag), "gsm8k": gsm8k_result(0.0, set())})
    for seed in seeds:
        case = SEEDS[seed]
        expert_gain, average_gain, ties_gain = case["gsm_gain"]
        write_model(run, "ag_news expert", "expert", seed,
                    {"ag_news": ag_news_result(case["ag_expert"]), "gsm8k": gsm8k_result(0.1, set())})
        write_model(run, "gsm8k expert", "expert", seed,
                    {"ag_news": ag_news_result(base_ag), "gsm8k": gsm8k_result(expert_gain, {0, 1, 2})})
        write_model(run, "merge: average", "merge", seed,
                    {"ag_news": ag_news_result(case["average"]), "gsm8k": gsm8k_result(average_gain, {0, 1})})
        write_model(run, "merge: ties", "merge", seed,
                    {"ag_news": ag_news_result(case["ties"]), "gsm8k": gsm8k_result(ties_gain, {0})},
                    relative_error=TIES_ERROR[seed])


def read_csv(run) -> list[dict]:
    with open(run / "results.csv") as handle:
        return list(csv.DictReader(handle))


def section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def md_row(markdown: str, name: str) -> list[str]:
    """The cells of the first table row whose model column is `name`."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == name:
            return cells[1:]
    raise AssertionError(f"no row {name!r} in\n{markdown}")


def md_rows(markdown: str, name: str, vs: str, metric: str) -> list[str]:
    """The cells after model and comparator of a row in the paired table of `metric` (its title)."""
    table = markdown.split(f"### {metric} (", 1)[1].split("\n\n", 2)[1]
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == [name, vs]:
            return cells[2:]
    raise AssertionError(f"no comparison {name!r} vs {vs!r} on {metric!r}")


@pytest.fixture(scope="module")
def two_seed_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    write_run(run)
    build_report(run)
    return run


def test_paired_comparisons_holm_and_retention_by_seed(two_seed_run):
    run = two_seed_run
    rows = read_csv(run)
    differences = {(r["model"], r["comparator"], r["seed"], r["metric"]): r
                   for r in rows if r["statistic"] == "difference"}

    ties = differences[("merge: ties", "ag_news expert", "0", "accuracy")]
    assert float(ties["value"]) == pytest.approx(8 / 24 - 16 / 24) and ties["test"] == "McNemar exact"
    assert float(ties["p"]) == pytest.approx(2 / 256) and float(ties["p_holm"]) == pytest.approx(4 / 256)
    assert ties["survives_holm"] == "True" and float(ties["ci_high"]) < 0
    average = differences[("merge: average", "ag_news expert", "0", "accuracy")]
    assert float(average["p"]) == pytest.approx(0.375) and float(average["p_holm"]) == pytest.approx(0.375)
    assert average["survives_holm"] == "False"
    # Against the average the family is TIES alone (the average is not compared with itself):
    # 5 examples only the average gets right, none only TIES does, p = 2/2^5, Holm leaves it.
    versus_average = differences[("merge: ties", "merge: average", "0", "accuracy")]
    assert float(versus_average["p"]) == float(versus_average["p_holm"]) == pytest.approx(2 / 32)
    assert not any(model == comparator for model, comparator, _, _ in differences)
    # Every declared metric, both seeds, each model against the comparators of its own seed.
    assert {key[3] for key in differences} == {"accuracy", "accuracy_norm", "macro_f1", "exact_match_flexible",
                                               "exact_match_strict", "gold_nll"}
    nll = differences[("merge: ties", "gsm8k expert", "1", "gold_nll")]
    assert float(nll["value"]) == pytest.approx(0.8 - 0.4) and nll["test"] == "paired permutation"
    assert float(nll["ci_low"]) == pytest.approx(0.4) and float(nll["ci_high"]) == pytest.approx(0.4)
    assert differences[("merge: ties", "gsm8k expert", "1", "exact_match_flexible")]["n"] == str(N_GENERATED)

    retention = {(r["model"], r["seed"], r["task"]): r for r in rows if r["statistic"] == "retention"}
    assert float(retention[("merge: ties", "0", "ag_news")]["value"]) == pytest.approx((8 - 6) / (16 - 6))
    assert float(retention[("merge: average", "0", "ag_news")]["value"]) == pytest.approx((13 - 6) / (16 - 6))
    gsm = retention[("merge: average", "1", "gsm8k")]
    assert (gsm["metric"], gsm["comparator"]) == ("gold_nll", "gsm8k expert")
    assert [float(gsm[k]) for k in ("value", "ci_low", "ci_high")] == pytest.approx([0.75, 0.75, 0.75])
    means = {(r["model"], r["task"]): r for r in rows if r["statistic"] == "retention mean over seeds"}
    assert float(means[("merge: average", "gsm8k")]["value"]) == pytest.approx((0.5 + 0.75) / 2)

    markdown = (run / "results.md").read_text()
    # A permutation p at 1/(swaps + 1) is that test's floor: the note says it bounds p.
    assert "9,999 random swaps unless all 2^n are fewer; a p of 0.0001 is then the least" in markdown
    assert md_rows(markdown, "merge: ties (seed 0)", "ag_news expert", "AG News acc")[2:] == \
        ["0.0078", "0.0156", "✓ worse"]
    assert md_rows(markdown, "merge: average (seed 0)", "ag_news expert", "AG News acc")[2:] == \
        ["0.3750", "0.3750", ""]
    assert md_rows(markdown, "merge: ties (seed 1)", "gsm8k expert", "GSM8K gold NLL ↓")[4] == "✓ worse"
    retained = section(markdown, "Retention")
    assert md_row(retained, "merge: ties (seed 0)")[0].startswith("0.200 [")
    assert md_row(retained, "merge: ties (seed 0)")[1] == "0.200 [0.200, 0.200]"  # (2.0 − 1.8) gain / 1.0
    assert md_row(retained, "merge: average: mean ± std over 2 seeds")[1] == \
        f"{np.mean([0.5, 0.75]):.3f} ± {np.std([0.5, 0.75], ddof=1):.3f}"


def test_score_table_shows_seed_rows_mean_std_and_stored_error(two_seed_run):
    run = two_seed_run
    markdown = (run / "results.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| model |"))
    assert header.split("|")[-2].strip() == "stored ΔW error"
    accuracies = [8 / 24, 10 / 24]
    mean_row = md_row(markdown, "merge: ties: mean ± std over 2 seeds")
    assert mean_row[0] == f"{np.mean(accuracies):.3f} ± {np.std(accuracies, ddof=1):.3f}"
    assert mean_row[-1] == f"{np.mean([0.12, 0.10]):.3f} ± {np.std([0.12, 0.10], ddof=1):.3f}"
    assert md_row(markdown, "merge: ties (seed 0)")[-1] == "0.120"
    assert md_row(markdown, "merge: average (seed 1)")[-1] == "–"
    assert md_row(markdown, "base")[0].startswith(f"{6 / 24:.3f} [")  # one base, shared by the seeds
    assert "base (seed" not in markdown
    rows = read_csv(run)
    score_means = {(r["model"], r["metric"]): r for r in rows if r["statistic"] == "score mean over seeds"}
    assert float(score_means[("merge: ties", "accuracy")]["std"]) == pytest.approx(np.std(accuracies, ddof=1))
    assert score_means[("merge: ties", "accuracy")]["n_seeds"] == "2"
    stored = {(r["model"], r["seed"]) for r in rows if r["statistic"] == "score" and r["relative_error"]}
    assert stored == {("merge: ties", "0"), ("merge: ties", "1")}
    assert (run / "results.png").stat().st_size > 5000


def test_the_plot_labels_a_compressed_merge_with_its_error(two_seed_run, monkeypatch):
    import matplotlib.figure

    from loracombench import report

    labels = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: labels.extend(
        t.get_text() for t in fig.axes[0].get_yticklabels()))
    report.plot(report.collect(two_seed_run), two_seed_run / "again.png")
    assert "merge: ties (seed 0) (ΔW error 0.12)" in labels and "merge: ties (seed 1) (ΔW error 0.10)" in labels
    assert "merge: average (seed 0)" in labels


def test_single_seed_report_names_no_seeds(tmp_path):
    run = tmp_path / "run"
    write_run(run, seeds=(0,))
    build_report(run)
    markdown = (run / "results.md").read_text()
    assert "seed" not in markdown
    assert md_rows(markdown, "merge: ties", "ag_news expert", "AG News acc")[3] == "0.0156"
    assert md_row(markdown, "merge: ties")[-1] == "0.120"


def test_retention_is_a_dash_when_the_expert_does_not_move_the_score(tmp_path):
    run = tmp_path / "run"
    base = {"ag_news": ag_news_result(span(6))}
    write_model(run, "base", "base", None, base)
    write_model(run, "ag_news expert", "expert", 0, base)
    write_model(run, "merge: average", "merge", 0, {"ag_news": ag_news_result(span(9))})
    build_report(run)
    assert md_row(section((run / "results.md").read_text(), "Retention"), "merge: average") == ["–"]
    [row] = [r for r in read_csv(run) if r["statistic"] == "retention"]
    assert row["value"] == row["ci_low"] == ""


def test_an_interval_over_part_of_the_resamples_is_marked_and_its_share_given(tmp_path):
    """The expert moves AG News on one example only (6), so in the resamples that leave it out
    retention is undefined; the interval is over the others, and the table and CSV say so."""
    run = tmp_path / "run"
    write_model(run, "base", "base", None, {"ag_news": ag_news_result(span(6))})
    write_model(run, "ag_news expert", "expert", 0, {"ag_news": ag_news_result(span(7))})
    write_model(run, "merge: average", "merge", 0, {"ag_news": ag_news_result(span(6) | {10})})
    build_report(run)
    retention = section((run / "results.md").read_text(), "Retention")
    assert md_row(retention, "merge: average")[0].endswith("]‡") and "‡: in some resamples" in retention
    [row] = [r for r in read_csv(run) if r["statistic"] == "retention"]
    kept = int(row["interval"].split(" over ")[1].split(" of ")[0])
    assert 0 < kept < 2000 and row["interval"].endswith("of 2000 resamples (the rest undefined)")


def test_a_diverged_models_nan_nll_is_shown_and_never_tested(tmp_path):
    """A NaN per-example NLL once gave a permutation p of 1/10001 (NaN never counts as extreme), a
    ✓ in the CSV, and then a crash writing the table."""
    run = tmp_path / "run"
    write_model(run, "base", "base", None, {"gsm8k": gsm8k_result(0.0, set())})
    write_model(run, "gsm8k expert", "expert", 0, {"gsm8k": gsm8k_result(0.5, set())})
    scores, rows = gsm8k_result(0.2, set())
    rows[0]["gold_nll"] = float("nan")
    write_model(run, "merge: ties", "merge", 0, {"gsm8k": ({**scores, "gold_nll": metrics.bootstrap_mean(
        [r["gold_nll"] for r in rows])}, rows)})
    build_report(run)
    tested = [r for r in read_csv(run) if r["statistic"] == "difference" and r["metric"] == "gold_nll"]
    assert tested and all(r["p"] == r["p_holm"] == r["value"] == "" and r["survives_holm"] == "False" for r in tested)
    assert "| merge: ties | gsm8k expert | 10 | – | – | – |  |" in (run / "results.md").read_text()


class ToyTask(Task):
    """A third task the report has never heard of: it shows what the task declares."""

    name = "toy"
    description = "toy"
    hub_path = "none"
    splits = hub_splits = ("test",)
    fields: ClassVar[dict] = {}
    kind = "multiple_choice"
    primary_metric = "hit_rate"
    chance = 0.5
    report_metrics = (ReportMetric("hit_rate", "Toy hits", True, "binary", field="hit"),
                      ReportMetric("loss", "Toy loss ↓", False, "mean", field="loss"))
    retention_metric = "loss"

    def prompt(self, row):
        return ""

    def target(self, row):
        return ""


def toy_result(hits: set[int], loss: float) -> tuple[dict, list[dict]]:
    rows = [{"index": i, "gold": 1, "hit": i in hits, "loss": loss + 0.1 * i} for i in range(8)]
    return {"hit_rate": metrics.proportion(len(hits), 8),
            "loss": metrics.bootstrap_mean([r["loss"] for r in rows])}, rows


def test_a_new_task_shows_its_declared_columns(tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "toy", ToyTask())
    run = tmp_path / "run"
    models = [("base", "base", None, 2, 3.0, 6), ("toy expert", "expert", 0, 6, 1.0, 6),
              ("merge: average", "merge", 0, 4, 2.5, 7)]
    for label, kind, seed, hits, loss, ag_correct in models:
        write_model(run, label, kind, seed,
                    {"toy": toy_result(span(hits), loss), "ag_news": ag_news_result(span(ag_correct))})
    build_report(run)
    markdown = (run / "results.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| model |"))
    assert [c.strip() for c in header.strip("|").split("|")] == \
        ["model", "AG News acc", "AG News acc_norm", "AG News macro-F1", "Toy hits", "Toy loss ↓"]
    retained = section(markdown, "Retention")
    assert "| model | toy retention (loss) |" in retained  # no AG News expert here: no AG News retention
    assert md_row(retained, "merge: average") == ["0.250 [0.250, 0.250]"]  # (3 − 2.5) / (3 − 1)
    assert md_rows(markdown, "merge: average", "toy expert", "Toy loss ↓")[1] == "+1.500 [+1.500, +1.500]"


def test_a_task_must_declare_the_metric_its_retention_uses(monkeypatch):
    class Undeclared(ToyTask):
        name = "toy_undeclared"
        retention_metric = "accuracy"

    with pytest.raises(ValueError, match="declares no report metric 'accuracy'; valid: hit_rate, loss"):
        register(Undeclared())
    assert "toy_undeclared" not in TASKS


def test_pairs_of_different_examples_are_refused(tmp_path):
    run = tmp_path / "run"
    write_model(run, "base", "base", None, {"ag_news": ag_news_result(span(6))})
    write_model(run, "ag_news expert", "expert", 0, {"ag_news": ag_news_result(span(9))})
    scores, rows = ag_news_result(span(7))
    rows[3]["gold"] = (rows[3]["gold"] + 1) % 4
    write_model(run, "merge: average", "merge", 0, {"ag_news": (scores, rows)})
    with pytest.raises(ValueError, match="example 3 has different gold answers"):
        build_report(run)


def test_samples_drawn_with_another_seed_are_not_paired_even_when_their_golds_agree(tmp_path):
    """Index i is the i-th row of a seeded sample: the same golds (as here) do not make the same examples."""
    run = tmp_path / "run"
    write_model(run, "base", "base", None, {"ag_news": ag_news_result(span(6))})
    write_model(run, "ag_news expert", "expert", 0, {"ag_news": ag_news_result(span(9))})
    write_model(run, "merge: average", "merge", 0, {"ag_news": ag_news_result(span(7))}, sample_seed=19)
    with pytest.raises(ValueError, match=r"test/24 \(sample seed 19\) and test/24 \(sample seed 1234\)"):
        build_report(run)


def test_results_scored_by_two_versions_of_a_task_are_not_paired(tmp_path):
    run = tmp_path / "run"
    write_model(run, "base", "base", None, {"ag_news": ag_news_result(span(6))})
    write_model(run, "ag_news expert", "expert", 0, {"ag_news": ag_news_result(span(9))})
    write_model(run, "merge: average", "merge", 0, {"ag_news": ag_news_result(span(7))})
    for slug, version in [("ag_news_expert_s0", {"version": 3, "source": "a"}),
                          ("merge_average_s0", {"version": 3, "source": "b"})]:
        path = run / "eval" / slug / "ag_news" / "metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "task_version": version}))
    with pytest.raises(ValueError, match="scored by two versions of the task's prompts and scoring"):
        build_report(run)
    # one version on both sides pairs as before
    path = run / "eval" / "merge_average_s0" / "ag_news" / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "task_version": {"version": 3, "source": "a"}}))
    build_report(run)
    assert "merge: average" in (run / "results.md").read_text()


def test_a_folder_that_is_no_run_keeps_the_users_own_results_files(tmp_path):
    folder = tmp_path / "gathered"  # result folders copied together by hand: no config.json, no list
    write_model(folder, "base", "base", None, {"ag_news": ag_news_result(span(6))})
    write_model(folder, "ag_news expert", "expert", 0, {"ag_news": ag_news_result(span(9))})
    report.build_report(folder)
    report.build_report(folder)  # its own earlier report is replaced
    assert "## Scores" in (folder / "results.md").read_text()
    for name in ("results.md", "results.csv", "results.png"):
        own = folder / name
        kept = own.read_bytes()
        own.write_text("my own notes\n")
        with pytest.raises(ValueError, match=f"is not a run folder and holds {name} that no report wrote"):
            report.build_report(folder)
        assert own.read_text() == "my own notes\n"
        own.write_bytes(kept)


def base_fingerprint(weights: str) -> dict:
    return {"name": "tiny-llama", "config_hash": "c0ffee", "weight_checksum": weights}


def test_results_of_another_base_model_are_refused_not_compared(tmp_path):
    """A result folder of another base, copied into a run, would be tested as if the difference were
    the composition's; one of the same base (and the base-less baselines) is fine."""
    run = tmp_path / "run"
    same, other = base_fingerprint("aaaa"), base_fingerprint("bbbb")
    write_model(run, "base", "base", None, {"ag_news": ag_news_result(span(6))}, base_model=same)
    write_model(run, "ag_news expert", "expert", 0, {"ag_news": ag_news_result(span(9))}, base_model=same)
    write_model(run, "tfidf_logreg", "baseline", None, {"ag_news": ag_news_result(span(20))})
    write_model(run, "merge: average", "merge", 0, {"ag_news": ag_news_result(span(7))}, base_model=same)
    build_report(run)
    write_model(run, "merge: ties", "merge", 0, {"ag_news": ag_news_result(span(8))}, base_model=other)
    with pytest.raises(ValueError, match=r"more than one base model: .* and merge: ties on ag_news"):
        build_report(run)


def test_a_result_file_cut_or_edited_since_its_run_wrote_it_is_refused(tmp_path):
    """Its manifest records every file's hash: a predictions.jsonl cut to its first rows would
    otherwise be paired on the examples left in it, under the n of its metrics.json."""
    from loracombench import cache

    run = tmp_path / "run"
    write_model(run, "base", "base", None, {"ag_news": ag_news_result(span(6))})
    write_model(run, "ag_news expert", "expert", 0, {"ag_news": ag_news_result(span(9))})
    write_model(run, "merge: average", "merge", 0, {"ag_news": ag_news_result(span(7))})
    for folder in run.glob("eval/*/*"):
        cache.record_outputs(folder, "key-of-" + folder.parent.name)
    build_report(run)
    predictions = run / "eval" / "merge_average_s0" / "ag_news" / "predictions.jsonl"
    predictions.write_text("".join(predictions.read_text().splitlines(keepends=True)[:8]))
    with pytest.raises(ValueError, match=r"merge_average_s0/ag_news: predictions.jsonl changed size"):
        build_report(run)


def test_models_named_in_compare_with_are_comparators_too(tmp_path):
    from loracombench import io

    run = tmp_path / "run"
    write_run(run, seeds=(0,))
    io.write_json(run / "config.json", {"compare_with": ["ties"]})
    build_report(run)
    differences = {(r["model"], r["comparator"], r["metric"]): r
                   for r in read_csv(run) if r["statistic"] == "difference"}
    # Seed 0: 5 examples only the average gets right (8..11, 20), none only TIES does; the family
    # against TIES is the average alone, so Holm leaves p = 2/2^5.
    versus_ties = differences[("merge: average", "merge: ties", "accuracy")]
    assert float(versus_ties["value"]) == pytest.approx((13 - 8) / 24)
    assert float(versus_ties["p"]) == float(versus_ties["p_holm"]) == pytest.approx(2 / 32)
    assert ("merge: ties", "merge: ties", "accuracy") not in differences
    assert md_rows((run / "results.md").read_text(), "merge: average", "merge: ties", "AG News acc")[3] == "0.0625"


def test_compare_with_names_a_composition_by_its_label_and_a_merge_by_its_merge_label(tmp_path):
    from loracombench import io

    run = tmp_path / "run"
    write_run(run, seeds=(0,))
    write_model(run, "router", "composition", 0,
                {"ag_news": ag_news_result(span(9)), "gsm8k": gsm8k_result(0.1, {0})})
    io.write_json(run / "config.json", {"compare_with": ["router", "ties"]})
    build_report(run)
    pairs = {(r["model"], r["comparator"]) for r in read_csv(run) if r["statistic"] == "difference"}
    assert {("merge: average", "router"), ("merge: average", "merge: ties"), ("router", "merge: ties"),
            ("merge: ties", "router")} <= pairs
    assert not any(comparator in ("ties", "merge: router") for _, comparator in pairs)


def test_compare_with_must_name_a_merge_or_composition_of_the_config():
    from loracombench.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"compare_with names \['tie'\].*valid: average"):
        load_config("smoke", {"compare_with": ["tie"]})


def gsm8k_answers_result(n_answered: int) -> tuple[dict, list[dict]]:
    """A GSM8K result that answered the first n_answered examples (all of them, for a baseline)."""
    rows = [{"index": i, "gold": str(i), **({"correct_flexible": i < 2, "correct_strict": i < 2}
                                            if i < n_answered else {})} for i in range(N_GSM)]
    answered = rows[:n_answered]
    return {metric: metrics.proportion(sum(r[field] for r in answered), n_answered)
            for metric, field in (("exact_match_flexible", "correct_flexible"),
                                  ("exact_match_strict", "correct_strict"))}, rows


def report_markdown(run) -> str:
    build_report(run)
    return (run / "results.md").read_text()


def gsm8k_note(markdown: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith("- gsm8k: "))


def test_the_sample_note_says_how_many_examples_models_and_baselines_were_scored_on(tmp_path):
    """Models generate only the first n_generate examples; a baseline answers all of them. One
    exact-match column holds both, so the note must give each its own count."""
    write_model(tmp_path, "base", "base", None, {"gsm8k": gsm8k_result(0.0, span(3))})
    write_model(tmp_path, "baseline: majority_answer", "baseline", None, {"gsm8k": gsm8k_answers_result(N_GSM)})
    assert gsm8k_note(report_markdown(tmp_path)) == (
        f"- gsm8k: {N_GSM} test examples (GSM8K EM (flexible) on the first {N_GENERATED} for models, "
        f"on all {N_GSM} for baselines; GSM8K EM (strict) on the first {N_GENERATED} for models, "
        f"on all {N_GSM} for baselines); chance 0.00")


def test_the_sample_note_names_no_partial_metric_when_only_baselines_answered_every_example(tmp_path):
    scores, rows = gsm8k_result(0.0, set())
    scores = {"gold_nll": scores["gold_nll"]}
    rows = [{k: v for k, v in row.items() if not k.startswith("correct")} for row in rows]
    write_model(tmp_path, "base", "base", None, {"gsm8k": (scores, rows)})
    write_model(tmp_path, "baseline: majority_answer", "baseline", None, {"gsm8k": gsm8k_answers_result(N_GSM)})
    assert gsm8k_note(report_markdown(tmp_path)) == f"- gsm8k: {N_GSM} test examples; chance 0.00"


def test_the_sample_note_of_models_alone_names_their_prefix(tmp_path):
    write_model(tmp_path, "base", "base", None, {"gsm8k": gsm8k_result(0.0, span(3))})
    assert gsm8k_note(report_markdown(tmp_path)) == (
        f"- gsm8k: {N_GSM} test examples (GSM8K EM (flexible) on the first {N_GENERATED}; "
        f"GSM8K EM (strict) on the first {N_GENERATED}); chance 0.00")


def test_a_mean_over_seeds_says_how_many_seeds_it_is_over_when_some_have_no_value():
    """The row is named for every seed of the label; a column some seeds lack (a retention whose
    expert did not move the score) must not pass for a mean over all of them."""
    records = [{"model": {"label": "merge: ties", "kind": "merge", "seed": seed}, "task": "ag_news"}
               for seed in (0, 1, 2)]
    cells = {("merge: ties", 0): [{"value": 0.5}, {"value": 0.25}],
             ("merge: ties", 1): [{"value": 0.7}, None],
             ("merge: ties", 2): [{"value": 0.6}, {"value": 0.75}]}
    mean_row = seeded_rows(cells, records)[-1]
    assert mean_row == ["merge: ties: mean ± std over 3 seeds", "0.600 ± 0.100", "0.500 ± 0.354 (2 of 3 seeds)"]


def test_a_run_by_code_older_than_its_lists_is_reported_whole_and_not_called_partial(tmp_path):
    """Runs made before current_results.json (and cell manifests) existed are finished runs: every
    result is shown, as before; only a run that keeps manifests but has no list is unfinished."""
    from loracombench import cache

    run = tmp_path / "run"
    write_model(run, "base", "base", None, {"ag_news": ag_news_result(span(6))})
    write_model(run, "ag_news expert", "expert", 0, {"ag_news": ag_news_result(span(9))})
    (run / "config.json").write_text('{"model": "tiny-llama", "tasks": ["ag_news"], "merges": []}')
    report.build_report(run)
    assert "Partial" not in (run / "results.md").read_text()
    cache.record_outputs(run / "eval" / "base" / "ag_news", "key")  # a cell of today's code: unfinished
    with pytest.raises(report.UnfinishedRunError, match="its run has not finished"):
        report.build_report(run)
