"""Classical baselines a task can declare (Task.baselines): the floor its adapters have to clear.

Each builder is told how to read a row (its text, its label or final answer) and returns a
Baseline whose config says exactly what it is; the sklearn estimators are built from that
config, so the record cannot drift from what ran. Hyperparameters are fixed here (sanity-checked
on the AG News validation split, never tuned on test). No task and no I/O: baselines.py fits
them on training rows, predicts evaluation rows and scores the predictions.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np

from .base import Baseline

TFIDF = {"ngram_range": (1, 2), "sublinear_tf": True, "lowercase": True}
COUNTS = {"ngram_range": (1, 2), "lowercase": True}

# Bag-of-words classifiers: {name: {"features": {vectorizer: kwargs}, "classifier": {estimator: kwargs}}}.
TEXT_CLASSIFIERS: dict[str, dict] = {
    "multinomial_nb": {"features": {"CountVectorizer": COUNTS}, "classifier": {"MultinomialNB": {"alpha": 1.0}}},
    "tfidf_logreg": {"features": {"TfidfVectorizer": TFIDF},
                     "classifier": {"LogisticRegression": {"C": 10.0, "solver": "newton-cg", "max_iter": 1000}}},
    "tfidf_linear_svm": {"features": {"TfidfVectorizer": TFIDF}, "classifier": {"LinearSVC": {"C": 1.0}}},
}


def _estimator(spec: dict, seed: int):
    """The one sklearn estimator a {class name: kwargs} spec names, seeded where it takes a seed."""
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import MultinomialNB
    from sklearn.svm import LinearSVC

    classes = {cls.__name__: cls for cls in (CountVectorizer, TfidfVectorizer, LogisticRegression,
                                             MultinomialNB, LinearSVC)}
    (name, kwargs), = spec.items()
    estimator = classes[name](**kwargs)
    if "random_state" in estimator.get_params():
        estimator.set_params(random_state=seed)
    return estimator


def majority_class(label: Callable[[dict], int]) -> Baseline:
    def predict(train: list[dict], evaluation: list[dict], seed: int) -> list[int]:
        majority = int(np.argmax(np.bincount([label(r) for r in train])))  # argmax: lowest label on ties
        return [majority] * len(evaluation)

    return Baseline("majority_class", {"rule": "most frequent training label (ties: lowest label)"}, predict)


def text_classifier(name: str, text: Callable[[dict], str], label: Callable[[dict], int]) -> Baseline:
    """One of TEXT_CLASSIFIERS over one text of each row."""
    config = TEXT_CLASSIFIERS[name]

    def predict(train: list[dict], evaluation: list[dict], seed: int) -> list[int]:
        y_train = np.array([label(r) for r in train])
        if np.unique(y_train).size < 2:  # sklearn refuses one-class training data
            return [int(y_train[0])] * len(evaluation)
        vectorizer, model = _estimator(config["features"], seed), _estimator(config["classifier"], seed)
        model.fit(vectorizer.fit_transform([text(r) for r in train]), y_train)
        return [int(p) for p in model.predict(vectorizer.transform([text(r) for r in evaluation]))]

    return Baseline(name, config, predict)


def text_classifiers(text: Callable[[dict], str], label: Callable[[dict], int]) -> tuple[Baseline, ...]:
    """The majority class, then every bag-of-words classifier of TEXT_CLASSIFIERS."""
    return (majority_class(label), *(text_classifier(name, text, label) for name in TEXT_CLASSIFIERS))


def majority_answer(answer: Callable[[dict], str]) -> Baseline:
    def predict(train: list[dict], evaluation: list[dict], seed: int) -> list[dict]:
        majority = Counter(answer(r) for r in train).most_common(1)[0][0]  # equal counts keep first-seen order
        return [{"prediction": majority} for _ in evaluation]

    return Baseline("majority_answer", {"rule": "most frequent gold final answer in train (ties: first seen)"},
                    predict)


def nearest_neighbour_answer(text: Callable[[dict], str], answer: Callable[[dict], str]) -> Baseline:
    """The final answer of the most similar training question (TF-IDF cosine)."""
    config = {"features": {"TfidfVectorizer": TFIDF},
              "rule": "final answer of the training question with the highest cosine similarity to the "
                      "evaluation question (ties: first training row)"}

    def predict(train: list[dict], evaluation: list[dict], seed: int) -> list[dict]:
        answers = [answer(r) for r in train]
        vectorizer = _estimator(config["features"], seed)  # rows are L2-normalised: dot product = cosine
        train_matrix = vectorizer.fit_transform([text(r) for r in train])
        eval_matrix = vectorizer.transform([text(r) for r in evaluation])
        out = []
        for start in range(0, eval_matrix.shape[0], 512):
            similarity = (eval_matrix[start:start + 512] @ train_matrix.T).toarray()
            best = similarity.argmax(axis=1)  # first maximum on ties
            out += [{"prediction": answers[j], "neighbour_index": int(j),
                     "similarity": round(float(similarity[k, j]), 6)} for k, j in enumerate(best)]
        return out

    return Baseline("tfidf_nearest_neighbour", config, predict)
