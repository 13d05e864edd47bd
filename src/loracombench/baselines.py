"""Classical baselines: the floor every LoRA adapter and merge has to clear.

AG News: majority class, multinomial naive Bayes (word 1-2-gram counts), TF-IDF + logistic
regression and TF-IDF + linear SVM. GSM8K: the most frequent training answer, and the final
answer of the most similar training question (TF-IDF cosine nearest neighbour).

All fit on training rows and predict evaluation rows; they report the same metrics, intervals
and result-file format as model evaluations (metrics.result_record / metrics.write_result).
Hyperparameters are fixed here (sanity-checked on the AG News validation split, never tuned on
test) and recorded in each result's config.

`evaluate_baselines` does no I/O; `run_baselines` writes one result folder per baseline.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np

from . import metrics
from .data import DataError, check_rows
from .tasks import Task, get_task

BASELINES: dict[str, list[str]] = {
    "ag_news": ["majority_class", "multinomial_nb", "tfidf_logreg", "tfidf_linear_svm"],
    "gsm8k": ["majority_answer", "tfidf_nearest_neighbour"],
}

TFIDF = {"ngram_range": (1, 2), "sublinear_tf": True, "lowercase": True}
COUNTS = {"ngram_range": (1, 2), "lowercase": True}

# What each baseline is, exactly as written to its result's config.
CONFIGS: dict[str, dict] = {
    "majority_class": {"rule": "most frequent training label (ties: lowest label)"},
    "multinomial_nb": {"features": {"CountVectorizer": COUNTS}, "classifier": {"MultinomialNB": {"alpha": 1.0}}},
    "tfidf_logreg": {"features": {"TfidfVectorizer": TFIDF},
                     "classifier": {"LogisticRegression": {"C": 10.0, "solver": "newton-cg", "max_iter": 1000}}},
    "tfidf_linear_svm": {"features": {"TfidfVectorizer": TFIDF}, "classifier": {"LinearSVC": {"C": 1.0}}},
    "majority_answer": {"rule": "most frequent gold final answer in train (ties: first seen)"},
    "tfidf_nearest_neighbour": {
        "features": {"TfidfVectorizer": TFIDF},
        "rule": "final answer of the training question with the highest cosine similarity to the "
                "evaluation question (ties: first training row)"},
}


def _check_rows(task: Task, rows: list[dict], what: str) -> None:
    check_rows(task, rows, f"{task.name} {what}")


# --------------------------------------------------------------------------- AG News

def _ag_news_predictions(name: str, train: list[dict], evaluation: list[dict], seed: int) -> np.ndarray:
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import MultinomialNB
    from sklearn.svm import LinearSVC

    y_train = np.array([r["label"] for r in train])
    if name == "majority_class":
        majority = int(np.argmax(np.bincount(y_train)))  # argmax: lowest label on ties
        return np.full(len(evaluation), majority)
    texts_train = [r["text"] for r in train]
    texts_eval = [r["text"] for r in evaluation]
    config = CONFIGS[name]
    if name == "multinomial_nb":
        vectorizer = CountVectorizer(**COUNTS)
        model = MultinomialNB(**config["classifier"]["MultinomialNB"])
    else:
        vectorizer = TfidfVectorizer(**TFIDF)
        if name == "tfidf_logreg":
            model = LogisticRegression(**config["classifier"]["LogisticRegression"], random_state=seed)
        else:
            model = LinearSVC(**config["classifier"]["LinearSVC"], random_state=seed)
    if np.unique(y_train).size < 2:  # sklearn refuses one-class training data
        return np.full(len(evaluation), int(y_train[0]))
    model.fit(vectorizer.fit_transform(texts_train), y_train)
    return model.predict(vectorizer.transform(texts_eval))


def _ag_news_result(task: Task, predicted, evaluation: list[dict]) -> tuple[dict, list[dict]]:
    gold = [r["label"] for r in evaluation]
    predicted = [int(p) for p in predicted]
    labels = task.labels
    rows = [{"index": i, "gold": g, "prediction": p, "correct": g == p,
             "gold_label": labels[g], "predicted_label": labels[p]}
            for i, (g, p) in enumerate(zip(gold, predicted))]
    return metrics.classification_metrics(gold, predicted, list(labels)), rows


# --------------------------------------------------------------------------- GSM8K

def _gsm8k_predictions(task: Task, name: str, train: list[dict], evaluation: list[dict]) -> list[dict]:
    """One dict per evaluation row: {"prediction": str, ...extra fields}."""
    answers = [task.reference_answer(r) for r in train]
    if name == "majority_answer":
        majority = Counter(answers).most_common(1)[0][0]  # equal counts keep first-seen order
        return [{"prediction": majority} for _ in evaluation]

    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(**TFIDF)  # rows are L2-normalised: dot product = cosine
    train_matrix = vectorizer.fit_transform([r["question"] for r in train])
    eval_matrix = vectorizer.transform([r["question"] for r in evaluation])
    out = []
    for start in range(0, eval_matrix.shape[0], 512):
        similarity = (eval_matrix[start:start + 512] @ train_matrix.T).toarray()
        best = similarity.argmax(axis=1)  # first maximum on ties
        out += [{"prediction": answers[j], "neighbour_index": int(j),
                 "similarity": round(float(similarity[k, j]), 6)} for k, j in enumerate(best)]
    return out


def _gsm8k_result(task: Task, predicted: list[dict], evaluation: list[dict]) -> tuple[dict, list[dict]]:
    # A baseline answers with the final line a trained model writes, "#### <answer>", and is
    # scored by the task's own extraction and comparison, exactly like a generated output.
    rows = [{"index": i, "gold": task.reference_answer(row), **extra,
             **task.score_output(f"#### {extra['prediction']}", row)}
            for i, (row, extra) in enumerate(zip(evaluation, predicted))]
    return metrics.proportions(rows, task.generation_metrics), rows


# --------------------------------------------------------------------------- API

def _evaluate(task_name: str, train_rows, eval_rows, seed: int):
    task = get_task(task_name)
    if task.name not in BASELINES:
        raise ValueError(f"no baselines are defined for task {task.name!r}")
    _check_rows(task, train_rows, "train")
    _check_rows(task, eval_rows, "evaluation")
    results = []
    for name in BASELINES[task.name]:
        started = time.time()
        if task.name == "ag_news":
            scores, predictions = _ag_news_result(
                task, _ag_news_predictions(name, train_rows, eval_rows, seed), eval_rows)
        else:
            scores, predictions = _gsm8k_result(task, _gsm8k_predictions(task, name, train_rows, eval_rows), eval_rows)
        results.append((name, scores, predictions, time.time() - started))
    return task, results


def evaluate_baselines(task_name: str, train_rows: list[dict], eval_rows: list[dict],
                       seed: int = 0) -> list[tuple[str, dict, list[dict]]]:
    """(baseline name, metrics, predictions) for every baseline of the task; no I/O."""
    _, results = _evaluate(task_name, train_rows, eval_rows, seed)
    return [(name, scores, predictions) for name, scores, predictions, _ in results]


def run_baselines(task_name: str, train_rows: list[dict], eval_rows: list[dict], out_dir,
                  seed: int = 0, split: str = "test", config: dict | None = None) -> list[Path]:
    """Evaluate every baseline, then write out_dir/<baseline>/{predictions.jsonl,metrics.json}.

    Nothing is written unless every baseline succeeded. `config` (e.g. the sample sizes the
    caller drew) is merged into each result's config. Returns the result folders."""
    task, results = _evaluate(task_name, train_rows, eval_rows, seed)
    folders = []
    for name, scores, predictions, elapsed in results:
        record = metrics.result_record(
            task=task.name, split=split, n=len(eval_rows), seed=seed,
            model={"label": name, "kind": "baseline"}, metrics=scores,
            primary_metric=task.primary_metric, chance=task.chance,
            config={"baseline": name, **CONFIGS[name], "n_train": len(train_rows), **(config or {})},
            elapsed_s=round(elapsed, 3))
        folder = Path(out_dir) / name
        metrics.write_result(folder, record, predictions)
        folders.append(folder)
    return folders
