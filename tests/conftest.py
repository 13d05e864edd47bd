"""Shared fixtures: the data mirror beside the checkout, tiny models, hand-made data folders."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch

# The test models are tiny: on 2 cores a second intra-op thread costs more in synchronisation than
# it gains, and under any other load it spins (4-10x slower). Every test runs with this setting.
torch.set_num_threads(1)

MIRROR = Path(os.environ.get("LORACOMBENCH_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
HAVE_MIRROR = (MIRROR / "ag_news" / "train.jsonl").is_file() and (MIRROR / "gsm8k" / "train.jsonl").is_file()
needs_mirror = pytest.mark.skipif(not HAVE_MIRROR, reason=f"data mirror not found at {MIRROR}")

TOPICS = ["election minister war", "goal match season", "stocks profit market", "software internet chip"]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_mirror(root: Path, splits: dict[str, dict[str, list]]) -> Path:
    """A mirror folder from {task: {split: rows}}."""
    for task, by_split in splits.items():
        for split, rows in by_split.items():
            write_jsonl(root / task / f"{split}.jsonl", rows)
    return root


def run_subcommand(argv: list[str]) -> int:
    """Run a `loracombench` subcommand through the real parser, letting its errors propagate."""
    from loracombench.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


@pytest.fixture
def small_mirror(tmp_path) -> Path:
    """A hand-made mirror: 4 balanced AG News classes, a few GSM8K problems."""
    return make_small_mirror(tmp_path / "mirror")


def make_small_mirror(root: Path) -> Path:
    """The small_mirror fixture's folder, for fixtures of a wider scope."""
    for split, n in (("train", 6), ("validation", 2), ("test", 5)):
        write_jsonl(root / "ag_news" / f"{split}.jsonl",
                    [{"text": f"{TOPICS[y]} story {i}", "label": y} for i in range(n) for y in range(4)])
    problems = [{"question": f"Tom has {a} apples and buys {b} more. How many apples?",
                 "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
                for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1)]]
    write_jsonl(root / "gsm8k" / "train.jsonl", problems)
    write_jsonl(root / "gsm8k" / "test.jsonl", problems[:4])
    return root


@pytest.fixture
def fast_bootstrap(monkeypatch):
    """Fewer macro-F1 bootstrap resamples, for tests that check accuracies, not the F1 interval:
    the 1,000 default resamples per multiple-choice result dominate their run time."""
    from loracombench import metrics

    monkeypatch.setattr(metrics, "bootstrap_statistic",
                        functools.partial(metrics.bootstrap_statistic, resamples=50))


@pytest.fixture(scope="session")
def tiny_gpt2():
    from loracombench.models import load_model

    return load_model("tiny-gpt2")


@pytest.fixture
def fresh_tiny():
    """A fresh tiny model per test (training wraps the instance it is given)."""
    from loracombench.models import load_model

    return lambda name="tiny-llama": load_model(name)
