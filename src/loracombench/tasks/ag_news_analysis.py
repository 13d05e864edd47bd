"""What the benchmark reports about AG News besides models: its classical baselines, and its
data statistics and plots (class counts, text lengths, and how much of the class length alone
gives away).

Kept apart from ag_news.py, whose source keys every cached adapter and evaluation of the task
(Task.fingerprint): an edit here recomputes no model. AgNews mixes AgNewsAnalysis in.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from .base import Baseline
from .classical import text_classifiers
from .eda_tools import (WORD_UNIT, figure, format_proportion, integer_bins, json_float, proportion, save_figure,
                        split_colour, summarize, word_count)


class AgNewsAnalysis:
    """Task hooks of AG News (see Task.baselines and Task.eda_*); mixed into AgNews."""

    # The length-only classifiers fit on train and are scored on test.
    eda_splits = ("train", "test")

    def baselines(self) -> tuple[Baseline, ...]:
        """Majority class, multinomial naive Bayes (word 1-2-gram counts), TF-IDF + logistic
        regression and TF-IDF + linear SVM, on the article text."""
        return text_classifiers(text=lambda row: row["text"], label=self.gold_index)

    def eda_stats(self, splits: dict[str, list[dict]]) -> dict:
        labels = tuple(self.class_names)
        per_split = {}
        for name, rows in splits.items():
            lengths = np.array([word_count(r["text"]) for r in rows])
            y = np.array([r["label"] for r in rows])
            counts = np.bincount(y, minlength=len(labels))
            per_split[name] = {
                "n": len(rows),
                "class_counts": {label: int(c) for label, c in zip(labels, counts)},
                "word_length": summarize(lengths),
                "word_length_by_class": {label: summarize(lengths[y == k])
                                         for k, label in enumerate(labels) if (y == k).any()},
            }
        return {"splits": per_split,
                "length_predicts_class": length_predicts_class(splits["train"], splits["test"], labels)}

    def eda_summary(self, stats: dict) -> list[str]:
        lpc = stats["length_predicts_class"]
        acc = lpc["decision_stump"]["accuracy"]
        return [f"{self.name}: length-only stump test accuracy {format_proportion(acc)} vs chance {lpc['chance']:.2f}"]

    def eda_plots(self, stats: dict, splits: dict[str, list[dict]], out_dir: Path) -> list[Path]:
        labels = list(self.class_names)
        return [plot_class_counts(stats, labels, out_dir / f"{self.name}_class_counts.png"),
                plot_word_lengths(stats, splits, labels, out_dir / f"{self.name}_word_lengths.png")]


# --------------------------------------------------------------------------- length alone

def fit_length_stump(lengths, labels) -> dict:
    """The best one-threshold rule on length ("decision stump"), found exhaustively.

    Rule: length <= threshold -> left_class, else right_class. Candidate thresholds are the
    midpoints between consecutive distinct training lengths; each side predicts its most frequent
    training class (ties: the lower label). The threshold with the highest training accuracy wins
    (ties: the smallest threshold). With a single distinct length there is no split: every row
    gets the majority class (threshold None)."""
    lengths = np.asarray(lengths, dtype=float)
    labels = np.asarray(labels, dtype=int)
    if lengths.size == 0:
        raise ValueError("a stump needs training rows")
    n_classes = int(labels.max()) + 1
    order = np.argsort(lengths, kind="stable")
    xs, ys = lengths[order], labels[order]
    onehot = np.zeros((xs.size, n_classes), dtype=int)
    onehot[np.arange(xs.size), ys] = 1
    left = np.cumsum(onehot, axis=0)           # class counts among the first i+1 sorted rows
    total = left[-1]
    majority = int(np.argmax(total))           # argmax breaks ties towards the lower label
    best = {"threshold": None, "left_class": majority, "right_class": majority,
            "train_accuracy": float(total[majority] / xs.size)}
    best_correct = int(total[majority])
    cut_points = np.nonzero(np.diff(xs) > 0)[0]  # last index of each run of equal lengths
    for i in cut_points:
        counts_left, counts_right = left[i], total - left[i]
        correct = int(counts_left.max() + counts_right.max())
        if correct > best_correct:
            best_correct = correct
            best = {"threshold": float((xs[i] + xs[i + 1]) / 2),
                    "left_class": int(np.argmax(counts_left)),
                    "right_class": int(np.argmax(counts_right)),
                    "train_accuracy": correct / xs.size}
    return best


def predict_length_stump(stump: dict, lengths) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=float)
    if stump["threshold"] is None:
        return np.full(lengths.size, stump["left_class"], dtype=int)
    return np.where(lengths <= stump["threshold"], stump["left_class"], stump["right_class"])


def length_predicts_class(train: list[dict], test: list[dict], labels: tuple[str, ...]) -> dict:
    """How much AG News class information word length alone carries.

    Two length-only classifiers fit on train and scored on test (decision stump, exact and
    hand-checkable; multinomial logistic regression on standardised length, which can carve
    the length axis into up to four class intervals), against chance and the majority class;
    plus a Kruskal-Wallis H test per split of whether the class length distributions differ."""
    from scipy import stats
    from sklearn.linear_model import LogisticRegression

    x_train = np.array([word_count(r["text"]) for r in train], dtype=float)
    y_train = np.array([r["label"] for r in train], dtype=int)
    x_test = np.array([word_count(r["text"]) for r in test], dtype=float)
    y_test = np.array([r["label"] for r in test], dtype=int)
    n_test = int(y_test.size)

    train_counts = np.bincount(y_train, minlength=len(labels))
    majority = int(np.argmax(train_counts))
    stump = fit_length_stump(x_train, y_train)
    stump_pred = predict_length_stump(stump, x_test)

    result = {
        "feature": f"length of text in {WORD_UNIT}",
        "fit_split": "train",
        "eval_split": "test",
        "chance": 1 / len(labels),
        "majority_class": {"label": labels[majority],
                           "accuracy": proportion((y_test == majority).sum(), n_test)},
        "decision_stump": {
            "rule": "length <= threshold -> left_class else right_class; threshold = midpoint "
                    "maximising train accuracy",
            "threshold": stump["threshold"],
            "left_class": labels[stump["left_class"]],
            "right_class": labels[stump["right_class"]],
            "train_accuracy": stump["train_accuracy"],
            "accuracy": proportion((stump_pred == y_test).sum(), n_test),
        },
    }
    if np.unique(y_train).size > 1 and np.ptp(x_train) > 0:
        mean, std = x_train.mean(), x_train.std()
        model = LogisticRegression(max_iter=1000)
        model.fit(((x_train - mean) / std)[:, None], y_train)
        lr_pred = model.predict(((x_test - mean) / std)[:, None])
        result["logistic_regression"] = {
            "model": "multinomial logistic regression (lbfgs, C=1) on standardised length",
            "predicted_classes_on_test": {labels[k]: int(v) for k, v in
                                          sorted(Counter(lr_pred.tolist()).items())},
            "accuracy": proportion((lr_pred == y_test).sum(), n_test),
        }
    else:
        result["logistic_regression"] = None

    kruskal = {}
    for split_name, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        groups = [xs[ys == k] for k in range(len(labels)) if (ys == k).any()]
        if len(groups) < 2 or np.ptp(xs) == 0:
            kruskal[split_name] = None
            continue
        h, p = stats.kruskal(*groups)
        n = int(xs.size)
        kruskal[split_name] = {"H": json_float(h), "df": len(groups) - 1, "p_value": json_float(p), "n": n,
                               "epsilon_squared": json_float(h / (n - 1)) if n > 1 else None}
    result["kruskal_wallis"] = kruskal
    return result


# --------------------------------------------------------------------------- plots

def plot_class_counts(stats: dict, labels: list[str], path: Path) -> Path:
    fig, (ax,) = figure(size=(7.5, 4.2))
    names = list(stats["splits"])
    width = 0.8 / len(names)
    x = np.arange(len(labels))
    for i, name in enumerate(names):
        counts = [stats["splits"][name]["class_counts"][label] for label in labels]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, counts, width,
                      label=f"{name} (n={sum(counts):,})", color=split_colour(name, i))
        ax.bar_label(bars, fontsize=7, padding=1)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.22)  # headroom for the legend above the bars
    ax.set_xlabel("class")
    ax.set_ylabel("rows")
    ax.set_title("AG News: class counts per split")
    ax.legend(loc="upper center", ncols=len(names), fontsize=9)
    return save_figure(fig, path)


def plot_word_lengths(stats: dict, splits: dict[str, list[dict]], labels: list[str], path: Path) -> Path:
    """Word lengths overall (per split) and per class (train)."""
    lpc = stats["length_predicts_class"]
    fig, (ax1, ax2) = figure(1, 2, size=(12, 4.6))
    all_lengths = {name: [word_count(r["text"]) for r in rows] for name, rows in splits.items()}
    bins = integer_bins(np.concatenate([np.asarray(v) for v in all_lengths.values()]))
    for i, (name, lengths) in enumerate(all_lengths.items()):
        ax1.hist(lengths, bins=bins, density=True, histtype="step", linewidth=1.5,
                 color=split_colour(name, i),
                 label=f"{name} (median {stats['splits'][name]['word_length']['p50']:.0f})")
    ax1.set_xlabel("text length (words, whitespace split)")
    ax1.set_ylabel("density")
    ax1.set_title("AG News: text length distribution per split")
    ax1.legend()

    train = splits["train"]
    groups = [[word_count(r["text"]) for r in train if r["label"] == k] for k in range(len(labels))]
    kept = [(label, g) for label, g in zip(labels, groups) if g]
    ax2.boxplot([g for _, g in kept], tick_labels=[label for label, _ in kept], showfliers=True,
                flierprops={"markersize": 2, "alpha": 0.4})
    ax2.set_xlabel("class (train split)")
    ax2.set_ylabel("text length (words, whitespace split)")
    kw = lpc["kruskal_wallis"].get("train")
    kw_text = (f"Kruskal-Wallis H = {kw['H']:.1f}, p = {kw['p_value']:.2g}" if kw
               else "Kruskal-Wallis: n/a")
    stump = lpc["decision_stump"]["accuracy"]
    ax2.set_title(f"AG News: text length per class (train); {kw_text}\n"
                  f"length-only stump, test accuracy {format_proportion(stump)} vs chance "
                  f"{lpc['chance']:.2f}", fontsize=10)
    return save_figure(fig, path)
