"""`make bench` (benchmarks/bench.py) on the tiny Llama: every section reports ratios, and what
each side-by-side pair computes agrees (the same scores, generations and predictions)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import MIRROR, needs_mirror

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

TINY = ["--model", "tiny-llama", "--data-dir", str(MIRROR), "--train-rows", "4", "--train-batch-size", "2",
        "--matmul-size", "128", "--score-rows", "4", "--score-batch-size", "4", "--label-tokens", "2",
        "--generate-rows", "3", "--generate-batch-size", "2", "--max-new-tokens", "8", "--adapters", "2",
        "--adapter-rows", "4", "--merge-repeats", "1", "--merge-layers", "1", "--memory-rows", "2"]
# What `loracombench run` prints: a cell computed ("done in") or not, and last the stages, which
# add up to less than the total (the report).
RUN_LOG = """[21:40:02] train ag_news (seed 0): computing
[21:43:02] train ag_news (seed 0): done in 180 s
[21:43:02] train gsm8k (seed 0): reused
[21:45:00] eval base on ag_news: done in 30 s
[21:46:00] eval merge_ties_seed0 on ag_news: done in 31 s
[21:47:00] eval base on gsm8k: done in 33 s
[22:01:30] stages: train 310 s, compose 40 s, evaluate 900 s; total 1290 s
"""


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    (out / "run.log").write_text(RUN_LOG)
    bench.main([*TINY, "--out-dir", str(out), "--run-log", str(out / "run.log")])
    return json.loads((out / "bench.json").read_text()), out


@needs_mirror
def test_every_section_reports_ratios_with_their_targets(result):
    payload, out = result
    assert list(payload["sections"]) == list(bench.SECTIONS)
    for name, section in payload["sections"].items():
        assert section["ratios"], name
        for figure in section["ratios"]:
            assert math.isfinite(figure["value"]) and figure["value"] > 0, (name, figure)
            assert (figure["met"] is None) == (figure["target"] is None), (name, figure)
    markdown = (out / "bench.md").read_text()
    assert all(f"## {name}" in markdown for name in bench.SECTIONS)
    # The kernels the timings hold for: AVX2 and AVX-512 machines give other ratios.
    assert payload["setup"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"CPUs ({torch.backends.cpu.get_cpu_capability()} kernels)" in markdown


@needs_mirror
def test_side_by_side_computations_agree(result):
    sections = result[0]["sections"]
    scoring, generation, swaps = sections["scoring"]["agreement"], sections["generation"]["agreement"], \
        sections["adapters"]["agreement"]
    assert scoring["max_abs_logprob_diff"] < 1e-4 and scoring["same_prediction"] == scoring["rows"] == 4
    assert generation["identical_outputs"] == generation["prompts"] == 3
    assert swaps["adapters_with_same_predictions"] == swaps["adapters"] == 2
    memory = sections["memory"]["agreement"]
    assert memory["identical_adapter_weights"] == memory["tasks"] == 2
    # The allocator variant's setting reaches its training process, and only its.
    runs = sections["memory"]["measured"]["gsm8k"]
    thresholds = [runs[variant]["MALLOC_MMAP_THRESHOLD_"] for variant in bench.MEMORY_VARIANTS]
    assert thresholds == [None, None, None, "1048576", None]
    assert 0 <= memory["chunked_loss_relative_weight_difference"] < 1e-2  # float rounding, after two steps
    assert all(a["holds"] for a in (scoring, generation, swaps, memory))


@needs_mirror
def test_training_counts_the_same_tokens_for_both_trainers(result):
    training = result[0]["sections"]["training"]["measured"]
    assert training["useful_tokens"] == sum(t["useful_tokens"] for t in training["per_task"].values())
    assert 0 < training["useful_tokens"] < training["processed_tokens"]
    ratio_of_rates = training["useful_tokens_per_s"]["ours"] / training["useful_tokens_per_s"]["hf_trainer_peft"]
    assert ratio_of_rates == pytest.approx(result[0]["sections"]["training"]["ratios"][0]["value"], rel=1e-3)


def test_token_count_leaves_out_padding_and_a_cached_prefix():
    from loracombench.batching import left_pad
    from loracombench.evaluation import after_prefix
    from loracombench.models import load_model

    model = load_model("tiny-llama").model.eval()
    batch = left_pad([[5, 6, 7, 8], [9, 10]], pad_id=0)
    with bench.counted_tokens(model) as counts, torch.no_grad():
        model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=True)
        prefix = model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=True).cache
        model(**batch)
        model(**after_prefix(batch, prefix, 3))
    assert counts == [3, 3, 6, 6]  # the continued batch reads its 6 new tokens, not the prefix again
    assert not model._forward_pre_hooks


@needs_mirror
def test_scoring_reports_its_share_of_the_matmul_peak(result):
    scoring = result[0]["sections"]["scoring"]
    measured = scoring["measured"]
    figure = next(r for r in scoring["ratios"] if r["figure"] == "model FLOP/s ÷ fp32 matmul peak, score_choices")
    assert measured["tokens_read"] > 0 and measured["forward_passes"] >= 1
    assert figure["value"] == pytest.approx(
        measured["model_gflops_per_s"] / measured["matmul_peak_gflops_per_s"], rel=1e-3)  # 4 digits kept
    # lm-eval reads every prompt whole; ours reads the shared instruction once.
    assert measured["lm_eval_tokens_read"] > measured["tokens_read"] and measured["lm_eval_forward_passes"] == 4
    figures = {r["figure"]: r["value"] for r in scoring["ratios"]}
    seconds = measured["seconds"]
    at_peak = seconds["score_choices"] * measured["model_gflops_per_s"] / measured["matmul_peak_gflops_per_s"]
    ceiling = figures["ceiling of the first ratio: lm-eval's seconds ÷ score_choices' FLOPs at the matmul peak"]
    assert ceiling == pytest.approx(seconds["lm_eval"] / at_peak, rel=1e-3)
    # Nothing runs above the peak, so the measured ratio is under its ceiling.
    assert figures["articles/s: score_choices ÷ lm-eval's scoring (its default, logits_cache)"] < ceiling
    assert measured["batch_size"] == 4


def test_a_quick_check_on_another_model_never_replaces_the_committed_bench(monkeypatch, tmp_path):
    written = []
    monkeypatch.setattr(bench, "DEFAULT_OUT", tmp_path / "results")
    monkeypatch.setattr(bench, "select_sections", lambda only: [])  # no section: only where it writes
    real_setup = bench.setup
    monkeypatch.setattr(bench, "setup", lambda args: written.append(args.out_dir) or real_setup(args))
    bench.main(["--model", "tiny-llama"])
    bench.main([])
    bench.main(["--model", "tiny-llama", "--out-dir", str(tmp_path / "chosen")])
    assert written == [tmp_path / "results" / "tiny-llama", tmp_path / "results", tmp_path / "chosen"]


def test_scoring_batches_as_the_default_run_unless_told():
    args = bench.build_parser().parse_args([])
    assert bench.Context(args).score_batch_size == 8 == bench.EvalSettings().batch_size
    assert bench.Context(bench.build_parser().parse_args(["--score-batch-size", "3"])).score_batch_size == 3


@needs_mirror
def test_the_run_log_gives_each_stage_share_and_the_budget(result):
    figures = {r["figure"]: r for r in result[0]["sections"]["run"]["ratios"]}
    shares = [figures[f"{stage} ÷ total (share of the run's time)"]["value"] for stage in ("train", "compose", "evaluate")]
    assert shares == pytest.approx([310 / 1290, 40 / 1290, 900 / 1290], abs=1e-4)
    budget = figures["run time ÷ 20 minutes (the run's own total, without start-up)"]
    assert budget["value"] == pytest.approx(1290 / 1200, abs=1e-4) and budget["met"] is False


def test_a_run_under_gnu_time_is_held_to_its_whole_wall_time(tmp_path):
    """The run's own total leaves out loading the data and the model and printing the report."""
    log = tmp_path / "run.log"
    log.write_text(RUN_LOG + "\tElapsed (wall clock) time (h:mm:ss or m:ss): 21:41.25\n"
                   "\tMaximum resident set size (kbytes): 3905688\n")
    run = bench.read_run_log(log)
    assert run["wall_s"] == pytest.approx(21 * 60 + 41.25) and run["total_s"] == 1290
    assert bench.run_seconds(run) == (pytest.approx(1301.25), "wall time")
    assert bench.clock_seconds("1:02:03.5") == pytest.approx(3723.5)


def test_lm_eval_style_scoring_shares_one_pass_among_one_token_choices_and_agrees_with_ours():
    """lm-eval's default (logits_cache) groups requests by context + continuation[:-1]: AG News's
    four one-token labels cost one pass per article, not four, for the same log-likelihoods."""
    from loracombench.models import load_model
    from loracombench.tasks import get_task

    loaded, task = load_model("tiny-llama"), get_task("ag_news")
    rows = [{"text": f"markets story {i}", "label": i % 4} for i in range(3)]
    with bench.counted_tokens(loaded.model) as grouped:
        shared = bench.score_like_lm_eval(loaded.model, loaded.tokenizer, task, rows)
    with bench.counted_tokens(loaded.model) as each:
        alone = bench.score_like_lm_eval(loaded.model, loaded.tokenizer, task, rows, reuse_logits=False)
    assert (len(grouped), len(each)) == (3, 12)
    assert shared == alone
    ours = bench.evaluation.score_choices(loaded.model, loaded.tokenizer, task, rows, 4, progress=False)
    assert bench.max_abs_diff(ours, shared) < 1e-4


def test_bad_inputs_are_refused_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--only", "scoring,nosuch"])
    assert "unknown section(s) nosuch; valid: training, scoring" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--only", "merge,merge"])
    assert "named twice: merge" in capsys.readouterr().err
    other = tmp_path / "other.log"
    other.write_text(RUN_LOG.replace("on gsm8k", "on mmlu"))
    with pytest.raises(SystemExit):
        bench.main(["--only", "scoring", "--run-log", str(other)])
    assert "computed cells of mmlu, which the default preset does not have" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--only", "run", "--cached-run-log", str(other)])
    assert "--cached-run-log needs --run-log" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--only", "run", "--no-run", "--run-log", str(other)])
    assert "--no-run and --run-log contradict" in capsys.readouterr().err
    log = tmp_path / "unfinished.log"
    log.write_text("[10:00:00] train ag_news\n")
    with pytest.raises(SystemExit):
        bench.main(["--only", "run", "--run-log", str(log)])
    assert f"{log}: no '[hh:mm:ss] stages:" in capsys.readouterr().err


@needs_mirror
def test_the_run_floor_counts_the_cells_the_run_computed(result):
    run = result[0]["sections"]["run"]
    counted = run["measured"]["model_flops"]
    assert counted["computed_cells"] == {"train": {"ag_news": 1}, "evaluate": {"ag_news": 2, "gsm8k": 1}}
    tokens, per_token = counted["tokens_per_cell"], counted["flops_per_token"]
    assert counted["flops"] == {"train": per_token["train"] * tokens["train"]["ag_news"],
                                "evaluate": per_token["evaluate"] * (2 * tokens["evaluate"]["ag_news"]
                                                                     + tokens["evaluate"]["gsm8k"])}
    peak = counted["matmul_peak_gflops_per_s"] * 1e9
    figures = {r["figure"]: r["value"] for r in run["ratios"]}
    assert figures["evaluate stage: model FLOP/s ÷ fp32 matmul peak (default preset's rows)"] == pytest.approx(
        counted["flops"]["evaluate"] / 900 / peak, rel=1e-3)
    assert counted["floor_s"] == pytest.approx(sum(counted["flops"].values()) / peak)


def test_a_run_log_counts_only_its_last_run(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("[10:00:00] eval base on gsm8k: done in 30 s\n[10:01:00] stages: evaluate 30 s; total 31 s\n"
                   + RUN_LOG.replace("stages: train 310 s", "stages: train 311 s"))
    run = bench.read_run_log(log)
    assert run["computed_cells"] == {"train": {"ag_news": 1}, "evaluate": {"ag_news": 2, "gsm8k": 1}}
    assert run["stages"]["train"] == 311


@needs_mirror
@pytest.mark.parametrize("task_name", ["ag_news", "gsm8k"])
def test_the_token_counter_reads_what_the_model_reads(task_name):
    """The stand-in that counts the run's evaluation tokens sees the passes the model sees."""
    from loracombench.data import load_sample
    from loracombench.models import load_model
    from loracombench.tasks import get_task

    loaded, task = load_model("tiny-llama"), get_task(task_name)
    rows, config = load_sample(task, "test", 5, 0, MIRROR), bench.EvalConfig(batch_size=2, n_generate=0)
    predict, _ = bench.evaluation.SCORERS[task.kind]
    with bench.counted_tokens(loaded.model) as counts:
        predict(loaded.model.eval(), loaded.tokenizer, task, rows, range(len(rows)), config, False)
    assert len(counts) >= 3 and bench.evaluation_tokens(loaded, task, rows, config) == sum(counts)


def test_the_bench_runs_the_run_and_its_cached_rerun_in_child_processes(tmp_path, small_mirror, monkeypatch):
    """One command measures the run itself: the child's own wall time and peak RSS (not the
    bench's), the cells it computed, and a rerun that computes none; both logs are kept."""
    from test_pipeline_and_cli import write_config

    monkeypatch.setattr(bench, "RUN_CONFIG", str(write_config(tmp_path)))
    out = tmp_path / "bench"
    args = SimpleNamespace(model="tiny-llama", data_dir=small_mirror, out_dir=out)
    held = np.ones(2 * 2**30 // 8)  # 2 GB in the bench process: the run's own figure must not count it
    run, rerun = bench.measure_default_run(SimpleNamespace(args=args))
    del held
    assert run["computed_cells"]["train"] == {"ag_news": 1, "gsm8k": 1}
    assert run["computed_cells"]["evaluate"] == {"ag_news": 4, "gsm8k": 4}
    assert rerun["computed_cells"] == {"train": {}, "evaluate": {}}
    for measured in (run, rerun):
        assert measured["wall_s"] > measured["total_s"] - 1 and 0.1 < measured["peak_rss_gb"] < 1.5
    assert "stages:" in (out / "run.log").read_text() and "cached" in (out / "cached-run.log").read_text()


def test_a_failed_run_names_its_log(tmp_path, monkeypatch):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nno_such_key: 1\n")
    monkeypatch.setattr(bench, "RUN_CONFIG", str(broken))
    args = SimpleNamespace(model="tiny-llama", data_dir=None, out_dir=tmp_path / "bench")
    with pytest.raises(bench.BenchError, match=r"exited with 2; its output: .*run\.log"):
        bench.measure_default_run(SimpleNamespace(args=args))
    assert "no_such_key" in (tmp_path / "bench" / "run.log").read_text()
