"""Every bad input through the real command line: exit status 2, one line that names the culprit,
and nothing written or destroyed (every file and folder around it hashes the same afterwards)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import make_small_mirror
from loracombench import adapters, metrics
from loracombench.cli import main
from test_merge_command import make_adapter

SMOKE = {
    "name": "t", "model": "tiny-llama", "n_train": {"ag_news": 8, "gsm8k": 4},
    "train": {"epochs": 1, "batch_size": 4, "max_length": 64},
    "eval": {"n_eval": {"ag_news": 8, "gsm8k": 3}, "n_generate": 2, "max_new_tokens": 4},
    "merges": [{"method": "average"}], "baselines": False,
}


def with_changes(**changes) -> str:
    config = yaml.safe_load(yaml.safe_dump(SMOKE))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = config
        for key in parents:
            node = node[key]
        node[last] = value
    return yaml.safe_dump(config)


CONFIGS = {
    "malformed.yaml": "name: [t\n  merges: - : x\n",
    "list.yaml": "- name: t\n",
    "unknown_key.yaml": with_changes(learning_rate=0.1),
    "zero_train_batch.yaml": with_changes(train__batch_size=0),
    "zero_eval_batch.yaml": with_changes(eval__batch_size=0),
    "negative_n_generate.yaml": with_changes(eval__n_generate=-1),
    "negative_n_train.yaml": with_changes(n_train={"ag_news": -1, "gsm8k": 4}),
    "oversized_n_train.yaml": with_changes(n_train={"ag_news": 1000, "gsm8k": 4}),
    "remote_code.yaml": with_changes(trust_remote_code=True),
    "cuda.yaml": with_changes(device="cuda"),
    "bad_device.yaml": with_changes(device="tpu9"),
    "cpu_index.yaml": with_changes(device="cpu:1"),
    "unknown_method.yaml": with_changes(merges=[{"method": "nope"}]),
    # the second of two entries of one method: the message says which
    "second_ties_bad.yaml": with_changes(merges=[{"method": "ties"},
                                                 {"method": "ties", "label": "t2", "params": {"density": 2}}]),
    "second_lorahub_bad.yaml": with_changes(compositions=[{"method": "lorahub"},
                                                          {"method": "lorahub", "label": "h2", "params": {"budget": 0}}]),
    "unknown_task.yaml": with_changes(tasks=["ag_news", "mnli"]),
    "string_rank.yaml": with_changes(train__r="sixteen"),
    "infinite_lr.yaml": with_changes(train__learning_rate=float("inf")),
    "per_task_unknown_key.yaml": with_changes(train_per_task={"ag_news": {"foo": 1}}),
    "per_task_bad_rate.yaml": with_changes(train_per_task={"ag_news": {"learning_rate": -1}}),
    "nan_weights.yaml": with_changes(merges=[{"method": "average", "weights": [float("nan"), 1.0]}]),
    "one_weight.yaml": with_changes(merges=[{"method": "average", "weights": [1.0]}]),
    "static_merge_without_method.yaml": with_changes(compositions=[{"method": "static_merge"}]),
    "composition_unknown_param.yaml": with_changes(compositions=[{"method": "route_oracle", "params": {"foo": 1}}]),
    "oversized_n_validation.yaml": with_changes(compositions=[{"method": "lorahub",
                                                               "params": {"n_validation": 1000}}]),
    # YAML's yes/true is not a number and 1 is not a flag (pydantic would read them as 1 and true)
    "yes_epochs.yaml": with_changes(train__epochs=True),
    "one_as_flag.yaml": with_changes(train__shared_init=1),
    "true_n_train.yaml": with_changes(n_train={"ag_news": True, "gsm8k": 4}),
    "train_split.yaml": with_changes(eval__split="train"),
    "true_seed.yaml": with_changes(seeds=[True]),
    "huge_seed.yaml": with_changes(seeds=[2**32]),
    "negative_eval_seed.yaml": with_changes(eval__seed=-1),
    "zero_sum_average.yaml": with_changes(merges=[{"method": "average", "weights": [1.0, -1.0]}]),
    "unknown_target.yaml": with_changes(train__target_modules=["q_proj", "qkv"]),
}


def write_weights(folder: Path, source: Path, weights: bytes | None) -> Path:
    """A copy of an adapter whose weights file is replaced by `weights` (None: keep)."""
    shutil.copytree(source, folder)
    if weights is not None:
        (folder / adapters.WEIGHTS_FILE).write_bytes(weights)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Inputs and output locations every case points at; built once, checked unchanged per case."""
    w = tmp_path_factory.mktemp("world")
    make_small_mirror(w / "mirror")
    shutil.copytree(w / "mirror", w / "bad_mirror")
    with open(w / "bad_mirror" / "ag_news" / "train.jsonl", "a") as handle:
        handle.write('{"text": "unterminated\n')
    a, b = make_adapter(w / "adapters" / "a", 1), make_adapter(w / "adapters" / "b", 2)
    make_adapter(w / "other_trained", 3)
    make_adapter(w / "gpt2_adapter", 4, base="tiny-gpt2", targets=("c_attn",))
    weights = (a / adapters.WEIGHTS_FILE).read_bytes()
    write_weights(w / "broken" / "truncated", a, weights[: len(weights) // 2])
    write_weights(w / "broken" / "garbage", a, b"\x00garbage" * 64)
    write_weights(w / "broken" / "bad_config", a, None)
    (w / "broken" / "bad_config" / adapters.CONFIG_FILE).write_text("{not json")
    adapters.merge_adapter_dirs([a, b], "average", w / "merged")
    record = metrics.result_record(task="ag_news", split="test", n=1, seed=0, model={"label": "x", "kind": "base"},
                                   metrics={}, primary_metric="accuracy", chance=0.25)
    metrics.write_result(w / "eval_done", record, [], [])
    (w / "file.txt").write_text("precious\n")
    (w / "foreign").mkdir()
    (w / "foreign" / "notes.txt").write_text("not ours\n")
    (w / "not_a_run" / "eval" / "base" / "ag_news").mkdir(parents=True)
    (w / "not_a_run" / "eval" / "base" / "ag_news" / "metrics.json").write_text("{truncated")
    (w / "configs").mkdir()
    for name, text in CONFIGS.items():
        (w / "configs" / name).write_text(text)
    (w / "configs" / "ok.yaml").write_text(with_changes())
    return w


def tree_digest(root: Path) -> dict[str, str]:
    """Every file's and folder's path under root, with the files' SHA-256."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


M = ["--data-dir", "{w}/mirror"]
TINY = ["--model", "tiny-llama"]
TRAIN = ["train", "--task", "ag_news", *TINY, *M]
EVAL = ["eval", "--task", "ag_news", *TINY, *M]
EVAL_GSM = ["eval", "--task", "gsm8k", *TINY, *M]
MERGE = ["merge", "--adapters", "{w}/adapters/a", "{w}/adapters/b"]
RUN = ["run", *M]

# (case, argv, what the one error line must name)
CASES = [
    # merge: outputs that would destroy data, and unreadable inputs
    ("merge-out-is-file", [*MERGE, "--out", "{w}/file.txt"], "file.txt is an existing file"),
    ("merge-out-inside-file", [*MERGE, "--out", "{w}/file.txt/sub"], "which is a file"),
    ("merge-out-foreign-folder", [*MERGE, "--out", "{w}/foreign"], "foreign is a non-empty folder"),
    ("merge-out-is-input", [*MERGE, "--out", "{w}/adapters/a"], "overlaps the input --adapters"),
    ("merge-out-inside-input", [*MERGE, "--out", "{w}/adapters/a/merged"], "overlaps the input --adapters"),
    ("merge-out-holds-inputs", [*MERGE, "--out", "{w}/adapters"], "overlaps the input --adapters"),
    ("merge-out-earlier-merge", [*MERGE, "--out", "{w}/merged"], "already holds a merged adapter; pass --overwrite"),
    ("merge-overwrite-other-kind", [*MERGE, "--out", "{w}/other_trained", "--overwrite"],
     "does not hold a merged adapter"),
    ("merge-truncated-weights", ["merge", "--adapters", "{w}/adapters/a", "{w}/broken/truncated", "--out", "{w}/new"],
     "truncated/adapter_model.safetensors: not a readable safetensors file"),
    ("merge-garbage-weights", ["merge", "--adapters", "{w}/adapters/a", "{w}/broken/garbage", "--out", "{w}/new"],
     "garbage/adapter_model.safetensors: not a readable safetensors file"),
    ("merge-malformed-config", ["merge", "--adapters", "{w}/adapters/a", "{w}/broken/bad_config", "--out", "{w}/new"],
     "bad_config/adapter_config.json: invalid JSON"),
    ("merge-missing-adapter", ["merge", "--adapters", "{w}/adapters/a", "{w}/nowhere", "--out", "{w}/new"],
     "nowhere is not a PEFT adapter folder"),
    ("merge-unknown-method", [*MERGE, "--method", "nope", "--out", "{w}/new"], "'nope'"),
    ("merge-weight-count", [*MERGE, "--weights", "1", "--out", "{w}/new"], "--weights: got 1 weights for 2 adapters"),
    ("merge-unknown-param", [*MERGE, "--param", "bogus=1", "--out", "{w}/new"], "bogus"),
    ("merge-no-out", MERGE, "--out"),
    # train: sizes, device, data, outputs
    ("train-batch-size-0", [*TRAIN, "--batch-size", "0", "--out", "{w}/new"], "--batch-size"),
    # seeds beyond what numpy and scikit-learn take failed late, in their words, or were accepted
    ("train-huge-seed", [*TRAIN, "--seed", str(2**64), "--out", "{w}/new"], "--seed: must be an integer from 0 to"),
    ("train-negative-data-seed", [*TRAIN, "--data-seed", "-1", "--out", "{w}/new"], "--data-seed: must be an integer"),
    ("eval-negative-seed", [*EVAL, "--seed", "-5", "--out", "{w}/new"], "--seed: must be an integer from 0 to"),
    ("train-batch-size-negative", [*TRAIN, "--batch-size", "-2", "--out", "{w}/new"], "--batch-size"),
    ("train-epochs-0", [*TRAIN, "--epochs", "0", "--out", "{w}/new"], "--epochs"),
    ("train-rank-0", [*TRAIN, "--r", "0", "--out", "{w}/new"], "--r"),
    ("train-lr-0", [*TRAIN, "--lr", "0", "--out", "{w}/new"], "--lr"),
    ("train-recompute-0", [*TRAIN, "--recompute-above-tokens", "0", "--out", "{w}/new"], "--recompute-above-tokens"),
    ("train-loss-chunk-0", [*TRAIN, "--loss-chunk-tokens", "0", "--out", "{w}/new"], "--loss-chunk-tokens"),
    ("train-dropout-1.5", [*TRAIN, "--lora-dropout", "1.5", "--out", "{w}/new"], "--lora-dropout"),
    ("train-max-length-2", [*TRAIN, "--max-length", "2", "--out", "{w}/new"], "--max-length"),
    ("train-grad-accum-0", [*TRAIN, "--grad-accum", "0", "--out", "{w}/new"], "--grad-accum"),
    ("train-n-train-0", [*TRAIN, "--n-train", "0", "--out", "{w}/new"], "--n-train"),
    ("train-n-train-not-int", [*TRAIN, "--n-train", "many", "--out", "{w}/new"], "--n-train"),
    ("train-n-train-beyond-split", [*TRAIN, "--n-train", "1000", "--out", "{w}/new"], "--n-train=1000"),
    ("train-cuda-absent", [*TRAIN, "--device", "cuda", "--out", "{w}/new"], "--device 'cuda'"),
    ("train-bad-device", [*TRAIN, "--device", "tpu9", "--out", "{w}/new"], "--device 'tpu9'"),
    ("train-unknown-task", ["train", "--task", "mnli", *TINY, *M, "--out", "{w}/new"], "'mnli'"),
    # a folder that is no model: said so, not in the tokenizer's words
    ("train-model-is-an-adapter", ["train", "--task", "ag_news", "--model", "{w}/other_trained", *M,
                                   "--out", "{w}/new"], "not a model folder (no config.json); it holds a LoRA adapter"),
    ("train-model-is-a-folder", ["train", "--task", "ag_news", "--model", "{w}/foreign", *M, "--out", "{w}/new"],
     "not a model folder (no config.json); give a registered name"),
    ("train-out-is-file", [*TRAIN, "--out", "{w}/file.txt"], "file.txt is an existing file"),
    ("train-out-earlier-adapter", [*TRAIN, "--out", "{w}/other_trained"], "already holds a trained adapter"),
    ("train-out-in-data", [*TRAIN, "--out", "{w}/mirror/adapter"], "overlaps the input --data-dir"),
    ("train-missing-data-dir", ["train", "--task", "ag_news", *TINY, "--data-dir", "{w}/nowhere", "--out", "{w}/new"],
     "nowhere does not exist"),
    ("train-malformed-jsonl", ["train", "--task", "ag_news", *TINY, "--data-dir", "{w}/bad_mirror",
                               "--out", "{w}/new"], "train.jsonl:25: invalid JSON"),
    # eval: sizes, device, adapters, outputs
    ("eval-n-eval-0", [*EVAL, "--n-eval", "0", "--out", "{w}/new"], "--n-eval"),
    ("eval-n-generate-negative", [*EVAL_GSM, "--n-generate", "-1", "--out", "{w}/new"], "--n-generate"),
    ("eval-batch-size-0", [*EVAL, "--batch-size", "0", "--out", "{w}/new"], "--batch-size"),
    ("eval-generate-batch-size-0", [*EVAL_GSM, "--generate-batch-size", "0", "--out", "{w}/new"],
     "--generate-batch-size"),
    ("eval-max-new-tokens-0", [*EVAL_GSM, "--max-new-tokens", "0", "--out", "{w}/new"], "--max-new-tokens"),
    ("eval-n-eval-beyond-split", [*EVAL, "--n-eval", "999", "--out", "{w}/new"], "--n-eval=999"),
    ("eval-unknown-split", [*EVAL, "--split", "dev", "--out", "{w}/new"], "'dev'"),
    ("eval-cuda-absent", [*EVAL, "--device", "cuda", "--out", "{w}/new"], "--device 'cuda'"),
    ("eval-out-is-file", [*EVAL, "--n-eval", "4", "--out", "{w}/file.txt"], "file.txt is an existing file"),
    ("eval-out-earlier-result", [*EVAL, "--n-eval", "4", "--out", "{w}/eval_done"], "already holds an evaluation"),
    ("eval-out-is-adapter", [*EVAL, "--adapter", "{w}/adapters/a", "--out", "{w}/adapters/a"],
     "overlaps the input --adapter"),
    ("eval-truncated-adapter", [*EVAL, "--n-eval", "4", "--adapter", "{w}/broken/truncated", "--out", "{w}/new"],
     "not a readable safetensors file"),
    ("eval-garbage-adapter", [*EVAL, "--n-eval", "4", "--adapter", "{w}/broken/garbage", "--out", "{w}/new"],
     "not a readable safetensors file"),
    ("eval-missing-adapter-named-first", ["eval", "--task", "ag_news", "--model", "{w}/no_such_model", *M, "--n-eval", "4",
                                          "--adapter", "{w}/no_such_adapter", "--out", "{w}/new"],
     "--adapter: "),
    ("eval-adapter-of-other-base", [*EVAL, "--n-eval", "4", "--adapter", "{w}/gpt2_adapter", "--out", "{w}/new"],
     "was made for base model tiny-gpt2"),
    # run: every config field and the command line
    ("run-malformed-yaml", [*RUN, "--config", "{w}/configs/malformed.yaml", "--out", "{w}/new"],
     "malformed.yaml: not valid YAML"),
    ("run-yaml-not-mapping", [*RUN, "--config", "{w}/configs/list.yaml", "--out", "{w}/new"],
     "list.yaml: the config must be a mapping"),
    ("run-unknown-key", [*RUN, "--config", "{w}/configs/unknown_key.yaml", "--out", "{w}/new"],
     "unknown_key.yaml: learning_rate: Extra inputs are not permitted"),
    ("run-train-batch-0", [*RUN, "--config", "{w}/configs/zero_train_batch.yaml", "--out", "{w}/new"],
     "zero_train_batch.yaml: train.batch_size"),
    ("run-eval-batch-0", [*RUN, "--config", "{w}/configs/zero_eval_batch.yaml", "--out", "{w}/new"],
     "zero_eval_batch.yaml: eval.batch_size"),
    ("run-n-generate-negative", [*RUN, "--config", "{w}/configs/negative_n_generate.yaml", "--out", "{w}/new"],
     "eval.n_generate"),
    ("run-n-train-negative", [*RUN, "--config", "{w}/configs/negative_n_train.yaml", "--out", "{w}/new"],
     "n_train sizes must be positive"),
    ("run-n-train-beyond-split", [*RUN, "--config", "{w}/configs/oversized_n_train.yaml", "--out", "{w}/new"],
     "n_train.ag_news=1000"),
    ("run-remote-code-without-flag", [*RUN, "--config", "{w}/configs/remote_code.yaml", "--out", "{w}/new"],
     "--trust-remote-code"),
    # every command that loads a config's model asks for the same consent
    ("sweep-remote-code-without-flag", ["sweep", *M, "--config", "{w}/configs/remote_code.yaml",
                                        "--learning-rates", "1e-3", "--out", "{w}/new"], "--trust-remote-code"),
    ("verbalizers-remote-code-without-flag", ["verbalizers", *M, "--config", "{w}/configs/remote_code.yaml",
                                              "--candidates", "a,b,c,d", "--out", "{w}/new"], "--trust-remote-code"),
    ("run-per-task-unknown-key", [*RUN, "--config", "{w}/configs/per_task_unknown_key.yaml", "--out", "{w}/new"],
     "train_per_task.ag_news.foo: Extra inputs are not permitted"),
    ("run-per-task-bad-rate", [*RUN, "--config", "{w}/configs/per_task_bad_rate.yaml", "--out", "{w}/new"],
     "train_per_task.ag_news.learning_rate: Input should be greater than 0"),
    ("run-infinite-lr", [*RUN, "--config", "{w}/configs/infinite_lr.yaml", "--out", "{w}/new"],
     "train.learning_rate"),
    ("run-nan-weights", [*RUN, "--config", "{w}/configs/nan_weights.yaml", "--out", "{w}/new"], "merges.0.weights"),
    ("run-weight-count", [*RUN, "--config", "{w}/configs/one_weight.yaml", "--out", "{w}/new"],
     "merges.0.weights (average): got 1 weights for 2 adapters"),
    ("run-static-merge-without-method", [*RUN, "--config", "{w}/configs/static_merge_without_method.yaml",
                                         "--out", "{w}/new"], "composition 'static_merge': missing a required"),
    ("run-composition-unknown-param", [*RUN, "--config", "{w}/configs/composition_unknown_param.yaml",
                                       "--out", "{w}/new"], "foo"),
    ("run-oversized-n-validation", [*RUN, "--config", "{w}/configs/oversized_n_validation.yaml",
                                    "--out", "{w}/new"], "n_validation of composition lorahub_n_validation1000=1000"),
    ("run-huge-seed", [*RUN, "--config", "{w}/configs/huge_seed.yaml", "--out", "{w}/new"],
     "seeds must be distinct integers from 0 to 4294967295"),
    ("run-negative-eval-seed", [*RUN, "--config", "{w}/configs/negative_eval_seed.yaml", "--out", "{w}/new"],
     "eval.seed"),
    ("run-yes-epochs", [*RUN, "--config", "{w}/configs/yes_epochs.yaml", "--out", "{w}/new"],
     "train.epochs: must be a number, not true/false"),
    ("run-one-as-flag", [*RUN, "--config", "{w}/configs/one_as_flag.yaml", "--out", "{w}/new"],
     "train.shared_init: must be true or false"),
    ("run-true-n-train", [*RUN, "--config", "{w}/configs/true_n_train.yaml", "--out", "{w}/new"],
     "n_train: must be a number, not true/false (at ag_news)"),
    ("run-true-seed", [*RUN, "--config", "{w}/configs/true_seed.yaml", "--out", "{w}/new"],
     "seeds: must be a number, not true/false (item 0)"),
    ("run-zero-sum-average", [*RUN, "--config", "{w}/configs/zero_sum_average.yaml", "--out", "{w}/new"],
     "merges.0.weights (average): average: the weights sum to 0"),
    ("run-train-split", [*RUN, "--config", "{w}/configs/train_split.yaml", "--out", "{w}/new"],
     "eval.split: a run scores its models on held-out rows"),
    ("train-infinite-lr", [*TRAIN, "--lr", "inf", "--out", "{w}/new"], "--lr"),
    ("train-unknown-target", [*TRAIN, "--target-modules", "q_proj", "qkv", "--out", "{w}/new"],
     "--target-modules qkv: no module of the base model is named so; its linear layers are down_proj"),
    ("run-unknown-target", [*RUN, "--config", "{w}/configs/unknown_target.yaml", "--out", "{w}/new"],
     "train.target_modules qkv: no module"),
    ("eda-bad-tokenizer", ["eda", *M, "--tokenizer", "{w}/nowhere", "--out", "{w}/new"], "--tokenizer "),
    ("verbalizers-oversized-n-validation", ["verbalizers", *M, "--config", "{w}/configs/ok.yaml", "--candidates",
                                            "A,B,C,D", "--n-validation", "100",
                                            "--out", "{w}/new"], "--n-validation=100 asks for more rows"),
    ("sweep-repeated-rate", ["sweep", *M, "--config", "{w}/configs/ok.yaml", "--learning-rates", "1e-3", "0.001",
                             "--out", "{w}/new"], "--learning-rates repeats a rate"),
    ("verbalizers-generation-task", ["verbalizers", *M, "--task", "gsm8k", "--candidates", "a,b",
                                     "--out", "{w}/new"], "--task gsm8k: verbalizers compares"),
    ("verbalizers-unknown-task", ["verbalizers", *M, "--task", "foo", "--candidates", "a,b,c,d",
                                  "--out", "{w}/new"], "unknown task 'foo'"),
    ("verbalizers-empty-label", ["verbalizers", *M, "--candidates", "A,,C,D", "--out", "{w}/new"],
     "--candidates 'A,,C,D': a label is empty"),
    ("verbalizers-too-few-labels", ["verbalizers", *M, "--candidates", "A,B,C,D", "X,Y", "--out", "{w}/new"],
     "--candidates 'X,Y': AG News needs 4 distinct labels"),
    ("run-cuda-absent", [*RUN, "--config", "{w}/configs/cuda.yaml", "--out", "{w}/new"], "device 'cuda'"),
    ("run-bad-device", [*RUN, "--config", "{w}/configs/bad_device.yaml", "--out", "{w}/new"], "device 'tpu9'"),
    ("run-cpu-index", [*RUN, "--config", "{w}/configs/cpu_index.yaml", "--out", "{w}/new"],
     "device 'cpu:1': there is one CPU device"),
    ("train-cpu-index", [*TRAIN, "--device", "cpu:1", "--out", "{w}/new"], "--device 'cpu:1': there is one CPU"),
    ("run-unknown-method", [*RUN, "--config", "{w}/configs/unknown_method.yaml", "--out", "{w}/new"],
     "merges.0 (nope): unknown merge method 'nope'"),
    ("run-second-merge-bad", [*RUN, "--config", "{w}/configs/second_ties_bad.yaml", "--out", "{w}/new"],
     "merges.1 (ties): ties: invalid value 2 for parameter 'density'"),
    ("run-second-composition-bad", [*RUN, "--config", "{w}/configs/second_lorahub_bad.yaml", "--out", "{w}/new"],
     "compositions.1 (lorahub): composition 'lorahub': budget must be an integer >= 1"),
    ("run-unknown-task", [*RUN, "--config", "{w}/configs/unknown_task.yaml", "--out", "{w}/new"], "mnli"),
    ("run-string-rank", [*RUN, "--config", "{w}/configs/string_rank.yaml", "--out", "{w}/new"], "train.r"),
    ("run-missing-config", [*RUN, "--config", "{w}/configs/nope.yaml", "--out", "{w}/new"],
     "no config file or preset"),
    ("run-out-is-file", [*RUN, "--config", "{w}/configs/ok.yaml", "--out", "{w}/file.txt"], "existing file"),
    ("run-out-foreign-folder", [*RUN, "--config", "{w}/configs/ok.yaml", "--out", "{w}/foreign"],
     "does not hold a loracombench run"),
    ("run-out-is-data", [*RUN, "--config", "{w}/configs/ok.yaml", "--out", "{w}/mirror"], "overlaps the input data_dir"),
    # diagnose, eda, baseline, report
    ("diagnose-one-adapter", ["diagnose", "--adapters", "{w}/adapters/a", "--out", "{w}/new"], "--adapters"),
    ("diagnose-out-is-file", ["diagnose", "--adapters", "{w}/adapters/a", "{w}/adapters/b", "--out", "{w}/file.txt"],
     "existing file"),
    ("eda-out-foreign-folder", ["eda", *M, "--no-tokens", "--out", "{w}/foreign"], "non-empty folder"),
    ("eda-missing-data-dir", ["eda", "--data-dir", "{w}/nowhere", "--no-tokens", "--out", "{w}/new"],
     "does not exist"),
    ("baseline-n-eval-0", ["baseline", "--task", "ag_news", *M, "--n-eval", "0", "--out", "{w}/new"], "--n-eval"),
    ("baseline-n-train-beyond-split", ["baseline", "--task", "gsm8k", *M, "--n-train", "50", "--out", "{w}/new"],
     "--n-train=50"),
    ("baseline-out-earlier-merge", ["baseline", "--task", "ag_news", *M, "--out", "{w}/merged"], "non-empty folder"),
    ("report-not-a-run", ["report", "{w}/foreign"], "no results"),
    ("report-corrupt-result", ["report", "{w}/not_a_run"], "metrics.json: invalid JSON"),
]


@pytest.mark.parametrize("argv, culprit", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(world, monkeypatch, capsys, argv, culprit):
    monkeypatch.chdir(world)  # a default output folder would land here too
    before = tree_digest(world)
    try:
        status = main([part.format(w=world) for part in argv])
    except SystemExit as exit_:  # argparse's own refusals
        status = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith("loracombench "), err
    assert culprit in lines[0], lines[0]
    assert "Traceback" not in err
    assert tree_digest(world) == before


def test_the_table_covers_at_least_40_inputs():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("command", [["run"], ["sweep", "--learning-rates", "1e-3"],
                                     ["verbalizers", "--candidates", "a,b,c,d"]])
def test_each_command_that_loads_a_configs_model_takes_the_remote_code_consent(command):
    from loracombench.cli import build_parser

    assert build_parser().parse_args([*command, "--trust-remote-code"]).trust_remote_code is True
    assert build_parser().parse_args(command).trust_remote_code is False


@pytest.mark.parametrize("entry, message", [
    ({"merges": [{"method": "average", "label": "../../../ESCAPED"}]}, "label '../../../ESCAPED' must be a plain name"),
    ({"merges": [{"method": "average", "label": "a/b"}]}, "label 'a/b' must be a plain name"),
    ({"compositions": [{"method": "route_oracle", "label": ".."}]}, "label '..' must be a plain name"),
    ({"name": "../../elsewhere"}, "name '../../elsewhere' must be a plain name"),
])
def test_a_name_that_becomes_a_folder_cannot_leave_the_run_folder(tmp_path, small_mirror, capsys, entry, message):
    """Labels and the run's name name folders: a path there would write, and replace, folders
    outside the run folder."""
    from test_pipeline_and_cli import SMOKE

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**SMOKE, **entry}))
    victim = tmp_path / "ESCAPED"
    victim.mkdir()
    (victim / "important.txt").write_text("mine")
    before = tree_digest(tmp_path)
    assert main(["run", "--config", str(config), "--data-dir", str(small_mirror), "--out", str(tmp_path / "o"
                                                                                             / "deep" / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert tree_digest(tmp_path) == before


def test_every_option_of_every_command_has_help_that_states_its_default():
    import argparse

    from loracombench.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        assert command.description, f"{name} --help has no description"
        text = " ".join(command.format_help().split())
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help"
            # an option left unset says what then happens: a default or that it is required
            unset = action.option_strings and action.default is None and not action.required
            assert not unset or any(word in action.help.lower() for word in ("default", "required")), where
            stated = action.default is None or isinstance(action.default, bool) or action.required
            assert stated or f"(default: {action.default})" in text or "default" in action.help.lower(), where


def test_eval_records_the_generations_it_made_not_more(tmp_path, small_mirror):
    """--n-generate larger than the sample generates the whole sample, and says so."""
    from loracombench import metrics

    out = tmp_path / "eval"
    assert main(["eval", "--task", "gsm8k", "--model", "tiny-llama", "--data-dir", str(small_mirror),
                 "--n-eval", "2", "--n-generate", "4", "--max-new-tokens", "2", "--out", str(out)]) == 0
    record = metrics.read_result(out)
    assert record["config"]["n_generate"] == 2 and record["metrics"]["exact_match_flexible"]["n"] == 2


def test_eval_scores_the_default_presets_sample_unless_told_otherwise(tmp_path, small_mirror, monkeypatch):
    """An adapter evaluated alone is scored on the rows and settings of the default run's table:
    every unset flag is the default preset's (here a stand-in preset), every given flag wins."""
    from loracombench import config, data
    from loracombench.tasks import get_task

    preset = tmp_path / "preset.yaml"
    raw = yaml.safe_load((config.PRESETS_DIR / "default.yaml").read_text())
    raw["eval"] = {"n_eval": {"ag_news": 4, "gsm8k": 3}, "n_generate": 1, "seed": 7, "max_new_tokens": 2,
                   "batch_size": 2}
    preset.write_text(yaml.safe_dump(raw))
    real = config.load_config
    monkeypatch.setattr(config, "load_config", lambda source=None, overrides=None: real(source or preset, overrides))
    tiny = ["--model", "tiny-llama", "--data-dir", str(small_mirror)]
    assert main(["eval", "--task", "gsm8k", *tiny, "--out", str(tmp_path / "unset")]) == 0
    record = metrics.read_result(tmp_path / "unset")
    assert {k: record["config"][k] for k in ("n_eval", "n_generate", "seed", "max_new_tokens", "batch_size")} == {
        "n_eval": 3, "n_generate": 1, "seed": 7, "max_new_tokens": 2, "batch_size": 2}
    sampled = data.load_sample(get_task("gsm8k"), "test", 3, 7, small_mirror)
    assert [p["gold"] for p in metrics.read_predictions(tmp_path / "unset")] == [
        r["answer"].split("####")[-1].strip() for r in sampled]

    assert main(["eval", "--task", "gsm8k", *tiny, "--n-eval", "2", "--n-generate", "0", "--seed", "3",
                 "--out", str(tmp_path / "given")]) == 0
    given = metrics.read_result(tmp_path / "given")["config"]
    assert (given["n_eval"], given["n_generate"], given["seed"], given["batch_size"]) == (2, 0, 3, 2)


def test_eval_takes_a_precision_and_refuses_one_the_device_lacks(tmp_path, small_mirror, capsys):
    tiny = ["eval", "--task", "ag_news", "--model", "tiny-llama", "--data-dir", str(small_mirror), "--n-eval", "4"]
    assert main([*tiny, "--dtype", "fp16", "--out", str(tmp_path / "fp16")]) == 2
    assert "--dtype fp16 needs a CUDA device" in capsys.readouterr().err and not (tmp_path / "fp16").exists()
    assert main([*tiny, "--dtype", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    assert metrics.read_result(tmp_path / "bf16")["config"]["dtype"] == "bf16"


def test_eval_records_which_adapter_weights_it_scored(tmp_path, small_mirror):
    adapter = tmp_path / "adapter"
    assert main(["train", "--task", "ag_news", "--model", "tiny-llama", "--data-dir", str(small_mirror),
                 "--n-train", "4", "--epochs", "1", "--batch-size", "4", "--max-length", "32",
                 "--out", str(adapter)]) == 0
    assert main(["eval", "--task", "ag_news", "--model", "tiny-llama", "--data-dir", str(small_mirror),
                 "--n-eval", "4", "--adapter", str(adapter), "--out", str(tmp_path / "eval")]) == 0
    weights = hashlib.sha256((adapter / adapters.WEIGHTS_FILE).read_bytes()).hexdigest()
    assert metrics.read_result(tmp_path / "eval")["model"]["adapter_weights_sha256"] == weights


def test_train_records_where_its_rows_came_from(tmp_path, small_mirror, monkeypatch):
    """The mirror's absolute path (as a run records it), also when $LORACOMBENCH_DATA_DIR names it:
    not "default" for mirror and hub alike."""
    monkeypatch.setenv("LORACOMBENCH_DATA_DIR", str(small_mirror))
    assert main(["train", "--task", "ag_news", "--model", "tiny-llama",
                 "--n-train", "4", "--epochs", "1", "--batch-size", "4", "--max-length", "32",
                 "--out", str(tmp_path / "adapter")]) == 0
    assert adapters.read_metadata(tmp_path / "adapter")["data"] == str(small_mirror.resolve())
