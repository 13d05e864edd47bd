"""Exploratory data analysis of the benchmark's tasks: statistics (JSON) and labelled plots.

Three layers, so that the CLI, the notebook and the tests share one implementation:

- `compute_stats(task_name, splits, tokenizer=None)` is pure: rows in, a JSON-ready dict out.
- `plot_all(stats, splits, out_dir)` draws one task's figures (PNG, written atomically).
- `run_eda(task_names, data_dir, out_dir, tokenizer=None)` loads, computes, plots and writes
  `eda_stats.json` last, so a present stats file marks a finished run.

Lengths in words are whitespace-separated words (`len(text.split())`); token lengths use the
tokenizer the caller passes (the base model's in the CLI) without special tokens.
Every input problem is raised as DataError/ValueError before anything is written.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

from . import io
from .data import DataError, check_rows, load_split, resolve_data_dir
from .tasks import Task, get_task

SCHEMA = "loracombench.eda/1"
STATS_FILE = "eda_stats.json"
WORD_UNIT = "words: whitespace-separated (len(text.split()))"
PERCENTILES = (50, 90, 95, 99)
Z95 = 1.959963984540054

# Splits each task's statistics cannot do without: AG News fits the length-only classifiers on
# train and scores them on test; the headline GSM8K correlation is the train split's.
REQUIRED_SPLITS = {"ag_news": ("train", "test"), "gsm8k": ("train",)}

# Calculator annotations in GSM8K reference solutions, e.g. <<48/2=24>>.
CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")


# --------------------------------------------------------------------------- small helpers

def word_count(text: str) -> int:
    return len(text.split())


def _num(value) -> float | None:
    """A JSON-safe float: numpy scalars become floats, NaN and infinities become None."""
    value = float(value)
    return value if math.isfinite(value) else None


def summarize(values) -> dict:
    """n, mean, sample standard deviation, min, percentiles (numpy's linear method) and max."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("cannot summarise an empty list of values")
    summary = {"n": int(values.size), "mean": _num(values.mean()),
               "std": _num(values.std(ddof=1)) if values.size > 1 else 0.0,
               "min": _num(values.min())}
    for q, value in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
        summary[f"p{q}"] = _num(value)
    summary["max"] = _num(values.max())
    return summary


def histogram(values) -> dict[str, int]:
    """Counts per distinct integer value, keys as strings in ascending numeric order (JSON)."""
    return {str(k): v for k, v in sorted(Counter(int(v) for v in values).items())}


def fisher_ci(r: float, n: int, method: str = "pearson") -> tuple[float | None, float | None]:
    """95% interval for a correlation by the Fisher z-transform.

    Standard error 1/sqrt(n-3) for Pearson; sqrt(1.06/(n-3)) for Spearman (Fieller, Hartley &
    Pearson 1957). Undefined (None, None) for n <= 3 or an undefined r."""
    if n <= 3 or r is None or not math.isfinite(r):
        return None, None
    if abs(r) >= 1:
        return float(r), float(r)
    se = math.sqrt((1.06 if method == "spearman" else 1.0) / (n - 3))
    z = math.atanh(r)
    return math.tanh(z - Z95 * se), math.tanh(z + Z95 * se)


def correlation(x, y) -> dict:
    """Pearson and Spearman correlations of two equally long sequences, with Fisher-z 95% CIs."""
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = int(x.size)
    out = {"n": n, "interval": "fisher_z95 (Spearman: se = sqrt(1.06/(n-3)))"}
    degenerate = n < 2 or np.ptp(x) == 0 or np.ptp(y) == 0
    for name, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        if degenerate:
            r, p = float("nan"), float("nan")
        else:
            result = fn(x, y)
            r, p = float(result.statistic), float(result.pvalue)
        low, high = fisher_ci(r, n, name)
        out[name] = {"r": _num(r), "ci_low": low, "ci_high": high, "p_value": _num(p)}
    return out


def check_splits(task: Task, splits: dict[str, list[dict]]) -> None:
    """Raise DataError unless the task's required splits are present, non-empty and valid."""
    required = REQUIRED_SPLITS.get(task.name)
    if required is None:
        raise ValueError(f"no EDA is defined for task {task.name!r} "
                         f"(defined for: {', '.join(sorted(REQUIRED_SPLITS))})")
    missing = [name for name in required if name not in splits]
    if missing:
        raise DataError(f"{task.name}: EDA needs the split(s) {', '.join(missing)} "
                        f"(got: {', '.join(splits) or 'none'})")
    for name, rows in splits.items():
        check_rows(task, rows, f"{task.name} [{name}]")


# --------------------------------------------------------------------------- AG News

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


def _proportion(correct: int, n: int) -> dict:
    from .metrics import proportion

    return proportion(int(correct), int(n))


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
                           "accuracy": _proportion((y_test == majority).sum(), n_test)},
        "decision_stump": {
            "rule": "length <= threshold -> left_class else right_class; threshold = midpoint "
                    "maximising train accuracy",
            "threshold": stump["threshold"],
            "left_class": labels[stump["left_class"]],
            "right_class": labels[stump["right_class"]],
            "train_accuracy": stump["train_accuracy"],
            "accuracy": _proportion((stump_pred == y_test).sum(), n_test),
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
            "accuracy": _proportion((lr_pred == y_test).sum(), n_test),
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
        kruskal[split_name] = {"H": _num(h), "df": len(groups) - 1, "p_value": _num(p), "n": n,
                               "epsilon_squared": _num(h / (n - 1)) if n > 1 else None}
    result["kruskal_wallis"] = kruskal
    return result


def ag_news_stats(task: Task, splits: dict[str, list[dict]]) -> dict:
    labels = tuple(task.class_names)
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


# --------------------------------------------------------------------------- GSM8K

def reasoning_steps(answer: str) -> int:
    """Non-empty lines before the '####' final-answer line."""
    body = answer.split("####")[0]
    return sum(1 for line in body.splitlines() if line.strip())


def calculator_annotations(answer: str) -> int:
    """Number of <<...>> calculator annotations."""
    return len(CALCULATOR_ANNOTATION.findall(answer))


def gsm8k_stats(task: Task, splits: dict[str, list[dict]]) -> dict:
    per_split = {}
    for name, rows in splits.items():
        q = np.array([word_count(r["question"]) for r in rows], dtype=float)
        a = np.array([word_count(r["answer"]) for r in rows], dtype=float)
        steps = [reasoning_steps(r["answer"]) for r in rows]
        notes = [calculator_annotations(r["answer"]) for r in rows]
        if np.ptp(q) > 0:
            slope, intercept = np.polyfit(q, a, 1)
            fit = {"slope": _num(slope), "intercept": _num(intercept),
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


# --------------------------------------------------------------------------- tokens

def token_counts(tokenizer, texts: list[str], batch_size: int = 1000) -> list[int]:
    """Token counts under an HF tokenizer, without special tokens (BOS/EOS)."""
    counts: list[int] = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], add_special_tokens=False)["input_ids"]
        counts.extend(len(ids) for ids in encoded)
    return counts


def token_stats(task: Task, splits: dict[str, list[dict]], tokenizer) -> dict:
    """Percentiles of prompt, target and prompt+target token counts, per split and pooled.

    prompt+target is tokenized as one string (task.prompt(row) + task.target(row))."""
    per_split, pooled = {}, []
    for name, rows in splits.items():
        prompts = [task.prompt(r) for r in rows]
        targets = [task.target(r) for r in rows]
        both = token_counts(tokenizer, [p + t for p, t in zip(prompts, targets)])
        pooled.extend(both)
        per_split[name] = {"prompt": summarize(token_counts(tokenizer, prompts)),
                           "target": summarize(token_counts(tokenizer, targets)),
                           "prompt_plus_target": summarize(both),
                           "prompt_plus_target_histogram": histogram(both)}
    return {
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "special_tokens": "not counted (add_special_tokens=False)",
        "splits": per_split,
        "all_splits": {"prompt_plus_target": summarize(pooled)},
    }


# --------------------------------------------------------------------------- entry points

def compute_stats(task_name: str, splits: dict[str, list[dict]], tokenizer=None) -> dict:
    """All statistics of one task, as a JSON-ready dict. tokenizer=None skips token lengths."""
    task = get_task(task_name)
    check_splits(task, splits)
    stats = {"task": task.name, "description": task.description, "length_unit": WORD_UNIT}
    if task.name == "ag_news":
        stats.update(ag_news_stats(task, splits))
    else:
        stats.update(gsm8k_stats(task, splits))
    stats["token_lengths"] = token_stats(task, splits, tokenizer) if tokenizer is not None else None
    return stats


def load_task_splits(task_names, data_dir=None) -> dict[str, dict[str, list[dict]]]:
    """Every split of each task from the mirror (or the hub's splits when no mirror is set)."""
    folder = resolve_data_dir(data_dir)
    loaded = {}
    for name in dict.fromkeys(task_names):  # keeps order, drops repeats
        task = get_task(name)
        if name not in REQUIRED_SPLITS:
            raise ValueError(f"no EDA is defined for task {name!r}")
        split_names = task.splits if folder is not None else task.hub_splits
        loaded[task.name] = {split: load_split(task, split, folder) for split in split_names}
    if not loaded:
        raise ValueError("no task given")
    return loaded


def write_eda(loaded: dict[str, dict[str, list[dict]]], out_dir, tokenizer=None,
              source: str | None = None) -> Path:
    """Compute every task's statistics, then draw the plots, then write eda_stats.json last."""
    out_dir = Path(out_dir)
    started = time.time()
    all_stats = {name: compute_stats(name, splits, tokenizer) for name, splits in loaded.items()}
    plots = []
    for name, stats in all_stats.items():
        plots += [p.name for p in plot_all(stats, loaded[name], out_dir)]
    record = {"schema": SCHEMA, "data": source, "tasks": all_stats, "plots": plots,
              "elapsed_s": round(time.time() - started, 2),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return io.write_json(out_dir / STATS_FILE, record)


def run_eda(task_names, data_dir, out_dir, tokenizer=None) -> Path:
    """Load, compute, plot and write; returns the path of eda_stats.json."""
    loaded = load_task_splits(task_names, data_dir)
    folder = resolve_data_dir(data_dir)
    return write_eda(loaded, out_dir, tokenizer, source=str(folder) if folder else "hub")


# --------------------------------------------------------------------------- plots

SPLIT_COLOURS = {"train": "tab:blue", "validation": "tab:green", "test": "tab:orange"}
DPI = 110
TITLES = {"ag_news": "AG News", "gsm8k": "GSM8K"}


def _colour(split: str, i: int) -> str:
    return SPLIT_COLOURS.get(split, f"C{i + 3}")


def _figure(nrows: int = 1, ncols: int = 1, size=(7.0, 4.5)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.ravel()


def _save(fig, path: Path) -> Path:
    with io.atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return path


def _int_bins(values, target: int = 60) -> np.ndarray:
    """Bin edges on half-integers, about `target` bins wide enough to cover integer data."""
    values = np.asarray(values)
    low, high = int(values.min()), int(values.max())
    width = max(1, math.ceil((high - low + 1) / target))
    return np.arange(low, high + width + 1, width) - 0.5


def _fmt_ci(d: dict) -> str:
    if d.get("r") is None:
        return "undefined"
    if d.get("ci_low") is None:
        return f"{d['r']:.3f}"
    return f"{d['r']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"


def _fmt_prop(d: dict) -> str:
    return f"{d['value']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"


def plot_ag_news(stats: dict, splits: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    labels = list(get_task("ag_news").class_names)
    paths = []

    # 1. class counts per split
    fig, (ax,) = _figure(size=(7.5, 4.2))
    names = list(stats["splits"])
    width = 0.8 / len(names)
    x = np.arange(len(labels))
    for i, name in enumerate(names):
        counts = [stats["splits"][name]["class_counts"][label] for label in labels]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * width, counts, width,
                      label=f"{name} (n={sum(counts):,})", color=_colour(name, i))
        ax.bar_label(bars, fontsize=7, padding=1)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.22)  # headroom for the legend above the bars
    ax.set_xlabel("class")
    ax.set_ylabel("rows")
    ax.set_title("AG News: class counts per split")
    ax.legend(loc="upper center", ncols=len(names), fontsize=9)
    paths.append(_save(fig, out_dir / "ag_news_class_counts.png"))

    # 2. word lengths overall (per split) and per class (train)
    lpc = stats["length_predicts_class"]
    fig, (ax1, ax2) = _figure(1, 2, size=(12, 4.6))
    all_lengths = {name: [word_count(r["text"]) for r in rows] for name, rows in splits.items()}
    bins = _int_bins(np.concatenate([np.asarray(v) for v in all_lengths.values()]))
    for i, (name, lengths) in enumerate(all_lengths.items()):
        ax1.hist(lengths, bins=bins, density=True, histtype="step", linewidth=1.5,
                 color=_colour(name, i),
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
                  f"length-only stump, test accuracy {_fmt_prop(stump)} vs chance "
                  f"{lpc['chance']:.2f}", fontsize=10)
    paths.append(_save(fig, out_dir / "ag_news_word_lengths.png"))
    return paths


def plot_gsm8k(stats: dict, splits: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    paths = []
    names = list(splits)

    # 1. question vs answer length, one panel per split
    fig, axes = _figure(1, len(names), size=(6.0 * len(names), 5.0))
    for ax, name in zip(axes, names):
        s = stats["splits"][name]
        q = np.array([word_count(r["question"]) for r in splits[name]])
        a = np.array([word_count(r["answer"]) for r in splits[name]])
        ax.scatter(q, a, s=4, alpha=0.25, color=_colour(name, 0), edgecolors="none",
                   label=f"problems (n={s['n']:,})")
        if s["fit_line"]:
            xs = np.array([q.min(), q.max()])
            ax.plot(xs, s["fit_line"]["intercept"] + s["fit_line"]["slope"] * xs, color="black",
                    linewidth=1.5, label=f"least-squares fit: {s['fit_line']['intercept']:.1f} + "
                                         f"{s['fit_line']['slope']:.2f}·x")
        corr = s["question_answer_correlation"]
        ax.set_title(f"GSM8K {name}: Pearson r = {_fmt_ci(corr['pearson'])}\n"
                     f"Spearman ρ = {_fmt_ci(corr['spearman'])}  (95% CI, Fisher z)", fontsize=10)
        ax.set_xlabel("question length (words, whitespace split)")
        ax.set_ylabel("answer length (words, whitespace split)")
        ax.legend(loc="upper left", fontsize=8)
    paths.append(_save(fig, out_dir / "gsm8k_length_scatter.png"))

    # 2. question and answer length distributions
    fig, axes = _figure(1, 2, size=(12, 4.4))
    for ax, field in zip(axes, ("question", "answer")):
        values = {n: [word_count(r[field]) for r in splits[n]] for n in names}
        bins = _int_bins(np.concatenate([np.asarray(v) for v in values.values()]))
        for i, n in enumerate(names):
            med = stats["splits"][n][f"{field}_words"]["p50"]
            ax.hist(values[n], bins=bins, density=True, histtype="step", linewidth=1.5,
                    color=_colour(n, i), label=f"{n} (median {med:.0f})")
        ax.set_xlabel(f"{field} length (words, whitespace split)")
        ax.set_ylabel("density")
        ax.set_title(f"GSM8K: {field} length distribution")
        ax.legend()
    paths.append(_save(fig, out_dir / "gsm8k_word_lengths.png"))

    # 3. reasoning steps and calculator annotations per answer
    fig, axes = _figure(1, 2, size=(12, 4.4))
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
                   [hist.get(str(k), 0) / total for k in keys], width, color=_colour(n, i),
                   label=f"{n} (mean {stats['splits'][n][key]['mean']:.2f})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of problems")
        ax.set_xticks(keys)
        ax.tick_params(axis="x", labelsize=8)
        ax.legend()
    axes[0].set_title("GSM8K: reasoning steps")
    axes[1].set_title("GSM8K: calculator annotations")
    paths.append(_save(fig, out_dir / "gsm8k_steps_annotations.png"))
    return paths


def plot_tokens(stats: dict, out_dir: Path) -> list[Path]:
    tokens = stats.get("token_lengths")
    if not tokens:
        return []
    task = stats["task"]
    fig, (ax,) = _figure(size=(8, 4.6))
    hists = {name: (np.array([int(k) for k in s["prompt_plus_target_histogram"]]),
                    np.array(list(s["prompt_plus_target_histogram"].values())))
             for name, s in tokens["splits"].items()}
    bins = _int_bins(np.concatenate([values for values, _ in hists.values()]))
    for i, (name, (values, counts)) in enumerate(hists.items()):
        ax.hist(values, bins=bins, weights=counts, density=True, histtype="step",
                linewidth=1.5, color=_colour(name, i), label=f"{name} (n={int(counts.sum()):,})")
    pooled = tokens["all_splits"]["prompt_plus_target"]
    for key, style in (("p50", ":"), ("p95", "--"), ("p99", "-."), ("max", "-")):
        ax.axvline(pooled[key], color="0.3", linestyle=style, linewidth=1,
                   label=f"{key} (all splits) = {pooled[key]:.0f}")
    ax.set_xlabel("prompt + target length (tokens, base-model tokenizer, no special tokens)")
    ax.set_ylabel("density")
    ax.set_title(f"{TITLES.get(task, task)}: token length of prompt + target")
    ax.legend(fontsize=8)
    return [_save(fig, out_dir / f"{task}_token_lengths.png")]


def plot_all(stats: dict, splits: dict[str, list[dict]], out_dir) -> list[Path]:
    """Draw one task's figures into out_dir; returns the PNG paths."""
    out_dir = Path(out_dir)
    if stats.get("task") == "ag_news":
        paths = plot_ag_news(stats, splits, out_dir)
    elif stats.get("task") == "gsm8k":
        paths = plot_gsm8k(stats, splits, out_dir)
    else:
        raise ValueError(f"no plots are defined for task {stats.get('task')!r}")
    return paths + plot_tokens(stats, out_dir)
