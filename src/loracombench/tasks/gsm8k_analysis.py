"""What the benchmark reports about GSM8K besides models: its classical baselines, and its data
statistics and plots (question and answer lengths and their correlation, reasoning steps,
calculator annotations).

Kept apart from gsm8k.py, whose source keys every cached adapter and evaluation of the task
(Task.fingerprint): an edit here recomputes no model. Gsm8k mixes Gsm8kAnalysis in.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .base import Baseline
from .classical import majority_answer, nearest_neighbour_answer
from .eda_tools import (WORD_UNIT, correlation, figure, format_correlation, histogram, integer_bins, json_float,
                        save_figure, split_colour, summarize, word_count)

# Calculator annotations in GSM8K reference solutions, e.g. <<48/2=24>>.
CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")


class Gsm8kAnalysis:
    """Task hooks of GSM8K (see Task.baselines and Task.eda_*); mixed into Gsm8k."""

    # The headline question/answer length correlation is the train split's.
    eda_splits = ("train",)

    def baselines(self) -> tuple[Baseline, ...]:
        """The most frequent training answer, and the final answer of the most similar training
        question (TF-IDF cosine nearest neighbour)."""
        return (majority_answer(self.reference_answer),
                nearest_neighbour_answer(text=lambda row: row["question"], answer=self.reference_answer))

    def answer_as_output(self, answer: str) -> str:
        # The final line a trained model writes: both lm-eval extractions read the answer from it.
        return f"#### {answer}"

    def eda_stats(self, splits: dict[str, list[dict]]) -> dict:
        per_split = {}
        for name, rows in splits.items():
            q = np.array([word_count(r["question"]) for r in rows], dtype=float)
            a = np.array([word_count(r["answer"]) for r in rows], dtype=float)
            steps = [reasoning_steps(r["answer"]) for r in rows]
            notes = [calculator_annotations(r["answer"]) for r in rows]
            if np.ptp(q) > 0:
                slope, intercept = np.polyfit(q, a, 1)
                fit = {"slope": json_float(slope), "intercept": json_float(intercept),
                       "method": "least squares: answer_words = intercept + slope * question_words"}
            else:
                fit = None
            per_split[name] = {
                "n": len(rows),
                "question_words": summarize(q),
                "answer_words": summarize(a),
                "question_answer_correlation": correlation(q, a),
                "fit_line": fit,
                "reasoning_steps": {**summarize(steps), "histogram": histogram(steps)},
                "calculator_annotations": {**summarize(notes), "histogram": histogram(notes),
                                           "answers_without_annotation": sum(1 for k in notes if k == 0)},
            }
        return {
            "definitions": {
                "question_words / answer_words": f"{WORD_UNIT}; answer = the full reference solution "
                                                 "including calculator annotations and the '#### N' line",
                "reasoning_steps": "non-empty lines before the '####' line of the answer",
                "calculator_annotations": "occurrences of <<...>> in the answer",
            },
            "splits": per_split,
        }

    def eda_summary(self, stats: dict) -> list[str]:
        lines = []
        for split, s in stats["splits"].items():
            corr = s["question_answer_correlation"]
            lines.append(f"{self.name} {split}: question/answer words Pearson {format_correlation(corr['pearson'])}, "
                         f"Spearman {format_correlation(corr['spearman'])}")
        return lines

    def eda_plots(self, stats: dict, splits: dict[str, list[dict]], out_dir: Path) -> list[Path]:
        return [plot_length_scatter(stats, splits, out_dir / f"{self.name}_length_scatter.png"),
                plot_word_lengths(stats, splits, out_dir / f"{self.name}_word_lengths.png"),
                plot_steps_annotations(stats, list(splits), out_dir / f"{self.name}_steps_annotations.png")]


def reasoning_steps(answer: str) -> int:
    """Non-empty lines before the '####' final-answer line."""
    body = answer.split("####")[0]
    return sum(1 for line in body.splitlines() if line.strip())


def calculator_annotations(answer: str) -> int:
    """Number of <<...>> calculator annotations."""
    return len(CALCULATOR_ANNOTATION.findall(answer))


# --------------------------------------------------------------------------- plots

def plot_length_scatter(stats: dict, splits: dict[str, list[dict]], path: Path) -> Path:
    """Question against answer length, one panel per split."""
    names = list(splits)
    fig, axes = figure(1, len(names), size=(6.0 * len(names), 5.0))
    for ax, name in zip(axes, names):
        s = stats["splits"][name]
        q = np.array([word_count(r["question"]) for r in splits[name]])
        a = np.array([word_count(r["answer"]) for r in splits[name]])
        ax.scatter(q, a, s=4, alpha=0.25, color=split_colour(name, 0), edgecolors="none",
                   label=f"problems (n={s['n']:,})")
        if s["fit_line"]:
            xs = np.array([q.min(), q.max()])
            ax.plot(xs, s["fit_line"]["intercept"] + s["fit_line"]["slope"] * xs, color="black",
                    linewidth=1.5, label=f"least-squares fit: {s['fit_line']['intercept']:.1f} + "
                                         f"{s['fit_line']['slope']:.2f}·x")
        corr = s["question_answer_correlation"]
        ax.set_title(f"GSM8K {name}: Pearson r = {format_correlation(corr['pearson'])}\n"
                     f"Spearman ρ = {format_correlation(corr['spearman'])}  (95% CI, Fisher z)", fontsize=10)
        ax.set_xlabel("question length (words, whitespace split)")
        ax.set_ylabel("answer length (words, whitespace split)")
        ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def plot_word_lengths(stats: dict, splits: dict[str, list[dict]], path: Path) -> Path:
    """Question and answer length distributions."""
    names = list(splits)
    fig, axes = figure(1, 2, size=(12, 4.4))
    for ax, field in zip(axes, ("question", "answer")):
        values = {n: [word_count(r[field]) for r in splits[n]] for n in names}
        bins = integer_bins(np.concatenate([np.asarray(v) for v in values.values()]))
        for i, n in enumerate(names):
            med = stats["splits"][n][f"{field}_words"]["p50"]
            ax.hist(values[n], bins=bins, density=True, histtype="step", linewidth=1.5,
                    color=split_colour(n, i), label=f"{n} (median {med:.0f})")
        ax.set_xlabel(f"{field} length (words, whitespace split)")
        ax.set_ylabel("density")
        ax.set_title(f"GSM8K: {field} length distribution")
        ax.legend()
    return save_figure(fig, path)


def plot_steps_annotations(stats: dict, names: list[str], path: Path) -> Path:
    """Reasoning steps and calculator annotations per answer."""
    fig, axes = figure(1, 2, size=(12, 4.4))
    for ax, key, xlabel in ((axes[0], "reasoning_steps", "reasoning steps per answer "
                             "(non-empty lines before ####)"),
                            (axes[1], "calculator_annotations", "calculator annotations <<...>> "
                             "per answer")):
        keys = sorted({int(k) for n in names for k in stats["splits"][n][key]["histogram"]})
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            hist = stats["splits"][n][key]["histogram"]
            total = stats["splits"][n]["n"]
            ax.bar(np.array(keys) + (i - (len(names) - 1) / 2) * width,
                   [hist.get(str(k), 0) / total for k in keys], width, color=split_colour(n, i),
                   label=f"{n} (mean {stats['splits'][n][key]['mean']:.2f})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of problems")
        ax.set_xticks(keys)
        ax.tick_params(axis="x", labelsize=8)
        ax.legend()
    axes[0].set_title("GSM8K: reasoning steps")
    axes[1].set_title("GSM8K: calculator annotations")
    return save_figure(fig, path)
