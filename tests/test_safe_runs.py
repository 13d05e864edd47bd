"""Nothing lost, nothing stale: verified caches, the report's current cells, locks, signals,
leftovers of killed saves, and outputs that never replace what they were not made for."""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import MIRROR, needs_mirror
from loracombench import cache, io, metrics, models
from loracombench.cli import main
from loracombench.pipeline import Experiment
from loracombench.tasks import get_task
from loracombench.tasks.ag_news import AgNews
from test_bad_inputs import SMOKE, tree_digest
from test_merge_command import make_adapter

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def fast_bootstrap(monkeypatch):
    """Fewer macro-F1 bootstrap resamples: these tests check which cells run, not intervals, and
    the 1,000 default resamples per AG News evaluation dominate a tiny run's time."""
    monkeypatch.setattr(metrics, "bootstrap_statistic", functools.partial(metrics.bootstrap_statistic, resamples=20))


def write_config(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**SMOKE, **changes}))
    return path


def cached_cells(output: str) -> set[str]:
    """The cells a run reused, from its log lines '[time] <cell>: cached'."""
    return {line.split("] ", 1)[1].removesuffix(": cached") for line in output.splitlines()
            if line.endswith(": cached")}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@needs_mirror
def test_damaged_outputs_of_a_finished_run_are_detected_and_recomputed(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--config", "smoke", "--data-dir", str(MIRROR), "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    weights = out / "adapters" / "seed0" / "ag_news" / "adapter_model.safetensors"
    predictions = out / "eval" / "merge_average_seed0" / "gsm8k" / "predictions.jsonl"
    originals = {weights: weights.read_bytes(), predictions: predictions.read_bytes()}
    weights.write_bytes(originals[weights][:1000])
    predictions.unlink()
    # What killed saves leave behind: a staging folder of a dead process, and one named before
    # temporary names carried a pid.
    leftovers = [out / "adapters" / "seed0" / f".ag_news.{dead_pid()}-abcdefgh.partial", out / "eval" / ".base.abcdefgh.partial"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"half")

    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "train ag_news (seed 0): adapter_model.safetensors changed size (1000 bytes" in log
    assert "eval merge_average_seed0 on gsm8k: predictions.jsonl is missing; recomputing" in log
    for file, content in originals.items():
        assert file.read_bytes() == content  # CPU training and scoring are deterministic
    assert not any(folder.exists() for folder in leftovers)
    # The retrained expert has the same weights, so every other cell is reused.
    from loracombench.baselines import baseline_names

    assert cached_cells(log) == {"train gsm8k (seed 0)", "merge average (seed 0)", "merge task_arithmetic (seed 0)"} | {
        f"baseline {name} on {task}" for task in ("ag_news", "gsm8k") for name in baseline_names(task)} | {
        f"eval {slug} on {task}" for slug in ("base", "expert_ag_news_seed0", "expert_gsm8k_seed0",
                                              "merge_average_seed0", "merge_task_arithmetic_seed0")
        for task in ("ag_news", "gsm8k")
    } - {"eval merge_average_seed0 on gsm8k"}


def test_a_changed_prompt_recomputes_its_task_cells_and_nothing_else(tmp_path, small_mirror, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["run", "--config", str(write_config(tmp_path)), "--data-dir", str(small_mirror), "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    original = AgNews.prompt
    monkeypatch.setattr(AgNews, "prompt", lambda self, row: "News topic?\n" + original(self, row))

    assert main(argv) == 0
    # AG News training and every AG News evaluation are redone; so is everything built on the
    # retrained AG News expert (the merge, and its evaluations on GSM8K too).
    assert cached_cells(capsys.readouterr().out) == {"train gsm8k (seed 0)", "eval base on gsm8k",
                                                     "eval expert_gsm8k_seed0 on gsm8k"}


def test_a_task_fingerprint_follows_its_version_and_code(monkeypatch):
    ag_news, gsm8k = get_task("ag_news"), get_task("gsm8k")
    before = (ag_news.fingerprint(), gsm8k.fingerprint())
    monkeypatch.setattr(AgNews, "version", AgNews.version + 1)
    assert ag_news.fingerprint() != before[0] and gsm8k.fingerprint() == before[1]
    monkeypatch.setattr(AgNews, "version", AgNews.version - 1)
    monkeypatch.setattr(AgNews, "target", lambda self, row: " Topic" + self.choices(row)[self.gold_index(row)])
    assert ag_news.fingerprint()["code"] != before[0]["code"]


def test_an_expert_is_retrained_when_the_training_loss_changes(tmp_path, small_mirror, monkeypatch):
    """A fix to the loss the experts train on (TARGET_LOSS_VERSION) must not reuse an adapter
    trained with the old one; nothing else about the run changes its training cells."""
    from loracombench import training
    from loracombench.config import load_config
    from loracombench.pipeline import Experiment

    # A training key holds its rows, so the run needs data: the hand-made mirror, CI or not.
    config = load_config("default", {"data_dir": str(small_mirror), "n_train": {"ag_news": 8, "gsm8k": 4}})
    experiment = Experiment(config, tmp_path)

    def keys():
        return [experiment.train_cell(task, {"weights": "w"}, 0).key for task in ("ag_news", "gsm8k")]

    before = keys()
    assert keys() == before
    monkeypatch.setattr(training, "TARGET_LOSS_VERSION", training.TARGET_LOSS_VERSION + 1)
    assert all(a != b for a, b in zip(keys(), before))


def test_a_removed_merge_leaves_the_report_and_is_listed_as_stale(tmp_path, small_mirror, capsys):
    out = tmp_path / "run"
    two = write_config(tmp_path, merges=[{"method": "average"}, {"method": "task_arithmetic"}])
    assert main(["run", "--config", str(two), "--data-dir", str(small_mirror), "--out", str(out)]) == 0
    one = write_config(tmp_path, merges=[{"method": "average"}])
    assert main(["run", "--config", str(one), "--data-dir", str(small_mirror), "--out", str(out)]) == 0
    assert main(["report", str(out)]) == 0  # the rebuilt report says the same
    capsys.readouterr()
    with open(out / "results.csv") as handle:
        assert {row["model"] for row in csv.DictReader(handle)} == {"base", "ag_news expert", "gsm8k expert",
                                                                  "merge: average"}
    table = (out / "results.md").read_text()
    assert "| merge: task_arithmetic |" not in table and "| merge: average |" in table
    assert "stale" in table and "eval/merge_task_arithmetic_seed0/ag_news, eval/merge_task_arithmetic_seed0/gsm8k" in table
    assert (out / "eval" / "merge_task_arithmetic_seed0" / "ag_news" / "metrics.json").is_file()  # kept on disk


def test_a_changed_config_that_stopped_before_its_end_gets_no_mixed_report(tmp_path, small_mirror, capsys,
                                                                          monkeypatch):
    """config.json is the new config's from the start, current_results.json the old config's until
    the end: the report refuses to pair them, and the finished rerun reports the new config."""
    out = tmp_path / "run"
    two = write_config(tmp_path, merges=[{"method": "average"}, {"method": "task_arithmetic"}])
    assert main(["run", "--config", str(two), "--data-dir", str(small_mirror), "--out", str(out)]) == 0
    one = write_config(tmp_path, merges=[{"method": "average"}])
    with monkeypatch.context() as patch:
        patch.setattr(Experiment, "eval_cell", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
        assert main(["run", "--config", str(one), "--data-dir", str(small_mirror), "--out", str(out)]) == 130
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    assert "lists the results of another config than" in capsys.readouterr().err
    assert main(["run", "--config", str(one), "--data-dir", str(small_mirror), "--out", str(out)]) == 0
    assert "| merge: task_arithmetic |" not in (out / "results.md").read_text()
    # The same config written out another way (an editor, git's line endings) is the same config.
    config = out / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()), indent=4) + "\r\n")
    assert main(["report", str(out)]) == 0


def test_an_unfinished_first_run_is_reported_only_when_asked_and_then_says_so(tmp_path, small_mirror, capsys,
                                                                              monkeypatch):
    """Stopped in its evaluations, a first run has some results and no list of its cells: a table
    of them would pass for the whole run's (found by killing runs at random moments)."""
    out = tmp_path / "run"
    argv = ["run", "--config", str(write_config(tmp_path)), "--data-dir", str(small_mirror), "--out", str(out)]
    from loracombench import pipeline

    evaluated = []
    real = pipeline.evaluate_composed

    def stop_after_three(*args, **kwargs):
        if len(evaluated) == 3:
            raise KeyboardInterrupt
        evaluated.append(args)
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "evaluate_composed", stop_after_three)
        assert main(argv) == 130
    assert len(list(out.glob("eval/*/*/metrics.json"))) == 3
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    assert "its run has not finished" in capsys.readouterr().err and not (out / "results.md").exists()
    assert main(["report", str(out), "--partial"]) == 0
    assert (out / "results.md").read_text().startswith("**Partial: the run in this folder has not finished.**")
    assert main(argv) == 0 and "Partial" not in (out / "results.md").read_text()


def test_a_second_run_on_a_locked_folder_exits_2_and_changes_nothing(tmp_path, small_mirror, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from loracombench import io\n"
                               "with io.exclusive_lock(sys.argv[1]):\n    print('locked', flush=True); sys.stdin.read()",
         str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["run", "--config", str(write_config(tmp_path)), "--data-dir", str(small_mirror), "--out", str(out)]
        before = tree_digest(tmp_path)
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"loracombench run: error: {out} is in use by another loracombench run (pid {holder.pid}); "
                       f"wait for it to finish, or choose another folder")
        assert tree_digest(tmp_path) == before
    finally:
        holder.stdin.close()
        holder.wait()
    with io.exclusive_lock(out):  # released when its holder ended
        pass


def test_a_place_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_probe = io.probe_writable

    def probe(folder, target):  # a read-only mount, as root meets it too
        if Path(folder) == locked:
            raise PermissionError(13, "Permission denied")
        real_probe(folder, target)

    monkeypatch.setattr(io, "probe_writable", probe)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the refusal"))
    assert main(["train", "--task", "ag_news", "--model", "tiny-llama", "--out", str(locked / "a" / "b")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"loracombench train: error: --out {locked / 'a' / 'b'}: cannot write in {locked} (Permission denied); "
        f"choose a folder you can write to (nothing was written)")
    assert not any(locked.iterdir())
    # an existing output folder must itself be writable: a resumed run writes inside it
    assert main(["run", "--config", "default", "--out", str(locked)]) == 2
    assert f"cannot write in {locked}" in capsys.readouterr().err


def test_writability_is_checked_where_each_command_writes(tmp_path, monkeypatch):
    from loracombench.outputs import OutputError, check_out

    locked, free = tmp_path / "locked", tmp_path / "free"
    for folder in (locked, free):
        folder.mkdir()
    real_probe = io.probe_writable

    def probe(folder, target):
        if Path(folder) == locked:
            raise PermissionError(13, "Permission denied")
        real_probe(folder, target)

    monkeypatch.setattr(io, "probe_writable", probe)
    # a run resumes inside its own folder: a parent it never writes to does not matter
    run = locked / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "m", "tasks": [], "merges": []}))
    assert check_out(run, "run") == run
    # a symlinked --out is published beside its target, so that is where it must be writable
    (locked / "link").symlink_to(free / "real")
    assert check_out(locked / "link", "merge") == locked / "link"
    (free / "back").symlink_to(locked / "real")
    with pytest.raises(OutputError, match=f"cannot write in {locked}"):
        check_out(free / "back", "merge")
    assert not [p for p in free.iterdir() if p.name not in ("back",)]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a folder's permission bits")
def test_a_read_only_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["merge", "--adapters", "a", "b", "--out", str(locked / "m")]) == 2
        assert f"cannot write in {locked}" in capsys.readouterr().err
    finally:
        locked.chmod(0o755)


def test_ctrl_c_while_the_command_line_is_read_gives_one_line(tmp_path, capsys, monkeypatch):
    from loracombench import cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["train", "--task", "ag_news", "--out", str(tmp_path / "a")]) == 130
    assert capsys.readouterr().err.splitlines() == ["interrupted before any work started; nothing was written"]
    assert not any(tmp_path.iterdir())


def test_an_interrupted_command_says_what_it_left(tmp_path, capsys, monkeypatch):
    from loracombench import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_eval", interrupted)
    assert main(["eval", "--task", "ag_news", "--model", "tiny-llama", "--out", str(tmp_path / "e")]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted; nothing half-written was left"


def test_sigterm_stops_like_ctrl_c_and_the_run_resumes(tmp_path, small_mirror, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["run", "--config", str(write_config(tmp_path)), "--data-dir", str(small_mirror), "--out", str(out)]
    composition_cell = Experiment.composition_cell

    def terminated_during_merge(self, *args):
        os.kill(os.getpid(), signal.SIGTERM)
        return composition_cell(self, *args)

    monkeypatch.setattr(Experiment, "composition_cell", terminated_during_merge)
    assert main(argv) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "terminated; finished cells are kept and a rerun resumes from them")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler lives only while a command runs
    assert not (out / "merges").exists()
    monkeypatch.setattr(Experiment, "composition_cell", composition_cell)
    assert main(argv) == 0
    assert {"train ag_news (seed 0)", "train gsm8k (seed 0)"} <= cached_cells(capsys.readouterr().out)


def test_a_save_removes_abandoned_temporaries_of_its_target_only(tmp_path):
    target = tmp_path / "adapter"
    abandoned = [tmp_path / f".adapter.{dead_pid()}-abcdefgh.partial", tmp_path / ".adapter.abcdefgh.old",
                 tmp_path / f".adapter.{dead_pid()}-abcdefgh.tmp"]
    kept = [tmp_path / f".adapter.{os.getpid()}-abcdefgh.partial",  # a save still in progress
            tmp_path / f".other.{dead_pid()}-abcdefgh.partial", tmp_path / ".adapter.notes"]
    for path in abandoned[:2] + kept:
        path.mkdir()
    abandoned[2].write_text("half")
    with io.atomic_dir(target) as staging:
        (staging / "f").write_text("done")
    assert not any(p.exists() for p in abandoned) and all(p.exists() for p in kept)
    assert (target / "f").read_text() == "done"


def test_a_cell_manifest_detects_every_damage(tmp_path):
    folder = tmp_path / "cell"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"12345")
    (folder / "sub" / "b.json").write_text("{}")
    cache.record_outputs(folder, "k1")
    assert cache.stale_reason(folder, "k1") is None
    assert cache.stale_reason(folder, "k2") == cache.KEY_CHANGED
    (folder / "a.bin").write_bytes(b"12345"[::-1])  # same size, other bytes
    assert "a.bin changed content" in cache.stale_reason(folder, "k1")
    (folder / "a.bin").write_bytes(b"1234")
    assert "a.bin changed size" in cache.stale_reason(folder, "k1")
    (folder / "a.bin").write_bytes(b"12345")
    (folder / "sub" / "b.json").unlink()
    assert cache.stale_reason(folder, "k1") == "sub/b.json is missing"
    (folder / cache.MANIFEST).write_text("{")
    assert "unreadable" in cache.stale_reason(folder, "k1")
    assert cache.stale_reason(tmp_path / "never", "k1") == cache.NOT_COMPUTED


def replaceable_commands(tmp_path: Path, mirror: Path) -> dict[str, list[str]]:
    """Every command whose --out --overwrite replaces wholesale, on the tiny models and a small mirror."""
    a, b = make_adapter(tmp_path / "a", 1), make_adapter(tmp_path / "b", 2)
    tiny, data = ["--model", "tiny-llama"], ["--data-dir", str(mirror)]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**SMOKE, "model": "tiny-llama"}))
    return {"train": ["train", "--task", "ag_news", *tiny, *data, "--n-train", "4", "--epochs", "1",
                      "--batch-size", "4", "--max-length", "32"],
            "merge": ["merge", "--adapters", str(a), str(b)],
            "eval": ["eval", "--task", "ag_news", *tiny, *data, "--n-eval", "4"],
            "baseline": ["baseline", "--task", "ag_news", *data, "--n-train", "8", "--n-eval", "4"],
            "diagnose": ["diagnose", "--adapters", str(a), str(b)],
            "eda": ["eda", *data, "--no-tokens"],
            "verbalizers": ["verbalizers", *data, "--config", str(config), "--candidates", "A,B,C,D",
                            "--n-validation", "4"]}


@pytest.mark.parametrize("command", ["train", "merge", "eval", "baseline", "diagnose", "eda", "verbalizers"])
def test_overwrite_replaces_only_what_the_command_writes(command, tmp_path, small_mirror, capsys):
    """--overwrite replaces an earlier output of the same command, and nothing else: a file or
    folder the user put beside it is never deleted with it (the command is refused instead)."""
    out = tmp_path / "out"
    argv = [*replaceable_commands(tmp_path, small_mirror)[command], "--out", str(out)]
    assert main(argv) == 0
    assert main([*argv, "--overwrite"]) == 0  # its own output is replaceable whole
    (out / "my_notes.txt").write_text("mine")
    (out / "my_analysis").mkdir()
    (out / "README.md").write_text("# my notes on this output\n")  # train's own is PEFT's model card
    before = tree_digest(out)
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert "(README.md, my_analysis/, my_notes.txt)" in error and "--overwrite would delete it" in error
    assert tree_digest(out) == before


def test_baseline_overwrite_keeps_a_result_folder_the_user_copied_in_under_another_name(tmp_path, small_mirror,
                                                                                         capsys):
    out = tmp_path / "out"
    argv = [*replaceable_commands(tmp_path, small_mirror)["baseline"], "--out", str(out)]
    assert main(argv) == 0
    first = sorted(p.name for p in out.iterdir())
    shutil.copytree(out / first[0], out / "my_model")  # the same two files, the user's own folder now
    before = tree_digest(out)
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 2
    assert "(my_model/)" in capsys.readouterr().err
    assert tree_digest(out) == before


def test_merge_replaces_an_earlier_merge_only_with_overwrite(tmp_path, capsys):
    a, b = make_adapter(tmp_path / "a", 1), make_adapter(tmp_path / "b", 2)
    out = tmp_path / "merged"
    base = ["merge", "--adapters", str(a), str(b), "--out", str(out)]
    assert main([*base, "--method", "average"]) == 0
    before = tree_digest(tmp_path)
    assert main([*base, "--method", "task_arithmetic"]) == 2
    assert "already holds a merged adapter; pass --overwrite" in capsys.readouterr().err
    assert tree_digest(tmp_path) == before
    assert main([*base, "--method", "task_arithmetic", "--overwrite"]) == 0
    assert io.read_json(out / "loracombench.json")["method"] == "task_arithmetic"
    after = tree_digest(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("merged")} == {
        k: v for k, v in before.items() if not k.startswith("merged")}  # the inputs are untouched


def test_an_output_filled_while_the_command_ran_is_kept_and_the_new_one_set_aside(tmp_path, capsys, monkeypatch):
    """--out was absent when merge began; another command (or the user) fills it before merge
    publishes. Nothing the user did not ask to replace is replaced: merge exits 2, the other
    output stays, and merge's complete output waits beside it under a name the error gives."""
    a, b = make_adapter(tmp_path / "a", 1), make_adapter(tmp_path / "b", 2)
    out = tmp_path / "merged"
    publish = io.atomic_dir

    @contextlib.contextmanager
    def filled_meanwhile(path):
        with publish(path) as staging:
            yield staging
            out.mkdir()
            (out / "theirs.txt").write_text("the other command's output")

    monkeypatch.setattr(io, "atomic_dir", filled_meanwhile)
    assert main(["merge", "--adapters", str(a), str(b), "--out", str(out), "--method", "average"]) == 2
    error = capsys.readouterr().err
    assert "was filled by something else while this command ran" in error
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    aside = next(tmp_path.glob("merged.not-published-*")) / "merged"
    assert str(aside) in error and io.read_json(aside / "loracombench.json")["method"] == "average"
    assert not [p for p in tmp_path.iterdir() if io.is_leftover(p.name)]


def test_a_symlinked_out_is_written_through_and_a_claim_ends_with_its_publish(tmp_path):
    from loracombench.adapters import merge_adapter_dirs

    a, b = make_adapter(tmp_path / "a", 1), make_adapter(tmp_path / "b", 2)
    target, link = tmp_path / "big" / "merged", tmp_path / "merged"
    target.mkdir(parents=True)
    link.symlink_to(target, target_is_directory=True)
    assert main(["merge", "--adapters", str(a), str(b), "--out", str(link), "--method", "average"]) == 0
    assert link.is_symlink() and io.read_json(target / "loracombench.json")["method"] == "average"
    # The command's claim on its --out is spent: library code may replace the output later.
    merge_adapter_dirs([a, b], "task_arithmetic", link)
    assert io.read_json(target / "loracombench.json")["method"] == "task_arithmetic"
    assert not list(tmp_path.glob("*not-published*")) and not list((tmp_path / "big").glob("*not-published*"))


def test_a_create_only_output_still_takes_the_place_of_leftovers_and_others_are_replaced(tmp_path):
    fresh, earlier = tmp_path / "fresh", tmp_path / "earlier"
    fresh.mkdir()
    (fresh / io.LOCK_FILE).write_text("123")  # a stale lock: an empty folder to check_out
    io.create_only(fresh)
    with io.atomic_dir(fresh) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in fresh.iterdir()) == ["new.txt"]
    earlier.mkdir()
    (earlier / "old.txt").write_text("old")
    with io.atomic_dir(earlier) as staging:  # unclaimed (a run's cell, or --overwrite): replaced
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in earlier.iterdir()) == ["new.txt"]


def test_run_refuses_remote_code_without_the_flag_but_accepts_it_with(tmp_path, small_mirror, monkeypatch):
    config = write_config(tmp_path, trust_remote_code=True)
    argv = ["run", "--config", str(config), "--data-dir", str(small_mirror), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert not (tmp_path / "run").exists()
    seen = []

    def stub_run(self):  # the experiment itself is tested elsewhere
        seen.append(self.config.trust_remote_code)
        (self.out / "results.md").write_text("table\n")
        return self.out

    monkeypatch.setattr(Experiment, "run", stub_run)
    assert main([*argv, "--trust-remote-code"]) == 0
    assert seen == [True]


def test_an_interrupted_rewrite_of_a_result_folder_leaves_the_earlier_result_whole(tmp_path, monkeypatch):
    """A result folder is published whole: Ctrl-C between its two files leaves the earlier
    predictions and metrics together, never new predictions beside old metrics."""
    folder = tmp_path / "eval" / "base" / "ag_news"
    old_record = {"schema": metrics.SCHEMA, "n": 1}
    metrics.write_result(folder, old_record, [{"index": 0, "prediction": "old"}], [{"text": "a"}])
    real_write_json = io.write_json

    def interrupted(path, data):
        if Path(path).name == "metrics.json":
            raise KeyboardInterrupt
        return real_write_json(path, data)

    monkeypatch.setattr(io, "write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        metrics.write_result(folder, {"schema": metrics.SCHEMA, "n": 2}, [{"index": 0, "prediction": "new"}],
                             [{"text": "a"}])
    assert metrics.read_result(folder) == old_record
    assert metrics.read_predictions(folder) == [{"index": 0, "prediction": "old", "doc": {"text": "a"}}]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["ag_news"]  # no staging folder left


def test_a_saved_adapter_is_readable_by_other_users_as_the_umask_allows(tmp_path):
    """safetensors creates owner-only files; a run folder or cache shared with other users must
    give them what the umask gives every other file."""
    path = make_adapter(tmp_path / "adapter", 1)
    expected = 0o666 & ~io._UMASK
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir()}
    assert modes["adapter_model.safetensors"] == expected and set(modes.values()) == {expected}, modes


@pytest.mark.parametrize("offline, reachable", [("1", False), ("TRUE", False), ("yes", False), ("FALSE", True),
                                                ("no", True), ("0", True), ("", True)])
def test_the_hub_check_reads_the_offline_flag_and_the_endpoints_port_as_huggingface_hub_does(
        monkeypatch, offline, reachable):
    import socket

    from loracombench.models import hub_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        assert hub_reachable(timeout=2) is reachable
