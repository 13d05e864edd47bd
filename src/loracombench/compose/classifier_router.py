"""Sequence-level routing by a text classifier: each prompt goes to the expert of the task the
classifier predicts from the prompt alone, never from the task label.

The router is TF-IDF features (word 1-2-grams) and a logistic regression over the experts'
tasks, fitted on the tasks' training prompts (the experts' own training rows). Why this router:
the alternatives the literature uses need more than the prompt text. LoraRetriever (Zhao et al.,
2024, arXiv:2402.09997) routes to the nearest centroid of a sentence embedder's vectors: a second
model to ship and run; a linear head on the base model's mean hidden state needs a base forward
pass per prompt at routing time, before the routed model's own. A linear model on sparse n-grams
fits in a second on thousands of prompts, decides each prompt on its own, and its weights are a
vocabulary, an idf vector and one coefficient row per task.

The fitted router is stored as it was fitted, not refitted at load: the vocabulary and classes in
JSON, idf, coefficients and intercepts in safetensors (no pickle). A refit would equal it only
while scikit-learn, numpy and BLAS give bit-identical solutions, and the run folder may move to
another machine; the stored weights route identically anywhere.

Its accuracy is reported twice: cross-validated on the training prompts (build metadata), and on
the test examples by the evaluator (routing_accuracy, from `expected_route`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from .. import io
from ..tasks import get_task
from .base import BuildInputs, Composed, Composition, Needs, RoutedAdapters, check_params
from .experts import EXPERTS_FILE, load_experts, save_experts

ROUTER_FILE = "router.json"
WEIGHTS_FILE = "router.safetensors"
SCHEMA = "loracombench.tfidf_router/1"
# The features of the AG News TF-IDF baseline (baselines.TFIDF), kept separate so that tuning
# the baseline cannot silently change the router.
FEATURES = {"ngram_range": [1, 2], "sublinear_tf": True, "lowercase": True}
# sklearn's default C; balanced class weights, so that the router's prior does not follow how
# many training rows each expert happened to get.
DEFAULTS = {"C": 1.0, "cv_folds": 5}


@dataclass
class TfidfRouter:
    """A fitted vectorizer and linear classifier; `routes` decides each prompt on its own."""

    vectorizer: object  # sklearn TfidfVectorizer
    classifier: object  # sklearn LogisticRegression

    @classmethod
    def fit(cls, prompts: list[str], tasks: list[str], C: float) -> "TfidfRouter":
        vectorizer, classifier = _unfitted(C)
        classifier.fit(vectorizer.fit_transform(prompts), tasks)
        return cls(vectorizer, classifier)

    def scores(self, prompts: list[str]) -> np.ndarray:
        return self.classifier.decision_function(self.vectorizer.transform(prompts))

    def routes(self, prompts: list[str]) -> list[str]:
        return [str(task) for task in self.classifier.predict(self.vectorizer.transform(prompts))]

    def save(self, folder: Path) -> None:
        vocabulary = {term: int(column) for term, column in self.vectorizer.vocabulary_.items()}
        io.write_json(folder / ROUTER_FILE, {"schema": SCHEMA, "features": FEATURES, "vocabulary": vocabulary,
                                             "classes": [str(c) for c in self.classifier.classes_]})
        weights = {"idf": self.vectorizer.idf_, "coef": self.classifier.coef_, "intercept": self.classifier.intercept_}
        save_file({name: np.ascontiguousarray(w) for name, w in weights.items()}, str(folder / WEIGHTS_FILE))

    @classmethod
    def load(cls, folder: Path) -> "TfidfRouter":
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        stored = io.read_json(folder / ROUTER_FILE)
        if stored.get("schema") != SCHEMA:
            raise ValueError(f"{folder / ROUTER_FILE}: schema {stored.get('schema')!r}, expected {SCHEMA!r}; rebuild it")
        weights = load_file(str(folder / WEIGHTS_FILE))
        vectorizer = TfidfVectorizer(**_sklearn_features(stored["features"]), vocabulary=stored["vocabulary"])
        vectorizer.idf_ = weights["idf"]  # sklearn's documented way to transfer a fitted idf
        classifier = LogisticRegression()
        classifier.classes_ = np.array(stored["classes"])
        classifier.coef_, classifier.intercept_ = weights["coef"], weights["intercept"]
        classifier.n_features_in_ = weights["coef"].shape[1]
        return cls(vectorizer, classifier)


class ClassifierRouting(Composition):
    name = "route_classifier"
    artefacts = (ROUTER_FILE, EXPERTS_FILE)
    libraries = ("scikit-learn",)
    paper = ("sequence-level routing to task experts as in LoraRetriever (Zhao et al., 2024, arXiv:2402.09997), "
             "with a TF-IDF + logistic regression router in place of its embedding retriever")

    def __init__(self, **params):
        self.params = check_params(self.name, params, DEFAULTS)
        C, folds = self.params["C"], self.params["cv_folds"]
        if isinstance(C, bool) or not isinstance(C, (int, float)) or not math.isfinite(C) or C <= 0:
            raise ValueError(f"composition {self.name!r}: C (inverse regularisation strength) must be a "
                             f"finite number > 0, got {C!r}; default {DEFAULTS['C']}")
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise ValueError(f"composition {self.name!r}: cv_folds must be an integer >= 2, got {folds!r}; "
                             f"default {DEFAULTS['cv_folds']}")

    def needs(self) -> Needs:
        return Needs(router_training=True)

    def build(self, inputs: BuildInputs, out_dir: Path) -> dict:
        prompts, tasks = training_prompts(self.name, inputs)
        started = time.time()
        cross_validated = cross_validate(prompts, tasks, self.params["C"], self.params["cv_folds"], inputs.seed)
        TfidfRouter.fit(prompts, tasks, self.params["C"]).save(out_dir)
        save_experts(out_dir, inputs.experts)
        return {"router": "tfidf+logistic_regression", "features": FEATURES,
                "n_prompts": {task: tasks.count(task) for task in inputs.experts},
                **cross_validated, "build_time_s": round(time.time() - started, 2)}

    def load(self, out_dir: Path) -> Composed:
        router = TfidfRouter.load(out_dir)
        experts = load_experts(out_dir)
        routed = sorted(str(task) for task in router.classifier.classes_)
        if routed != sorted(experts):
            raise ValueError(f"{out_dir}: the router's tasks {routed} are not "
                             f"the experts' {sorted(experts)}; rebuild it")
        # The task argument is ignored: the router decides from each prompt alone.
        return RoutedAdapters(experts, lambda _task, prompts: router.routes(prompts))


def training_prompts(name: str, inputs: BuildInputs) -> tuple[list[str], list[str]]:
    """Every expert's training prompts, labelled with its task; one error for a task without any."""
    if len(inputs.experts) < 2:
        raise ValueError(f"composition {name!r} routes between at least two experts, got {sorted(inputs.experts)}")
    missing = sorted(task for task in inputs.experts if len(inputs.train_rows.get(task) or []) < 2)
    if missing:
        raise ValueError(f"composition {name!r}: fewer than 2 training rows for task(s) {missing} (the router "
                         f"learns from each expert's training prompts); given: "
                         f"{ {task: len(rows) for task, rows in inputs.train_rows.items()} }")
    prompts, tasks = [], []
    for task_name in inputs.experts:
        task = get_task(task_name)
        prompts += [task.prompt(row) for row in inputs.train_rows[task_name]]
        tasks += [task_name] * len(inputs.train_rows[task_name])
    return prompts, tasks


def cross_validate(prompts: list[str], tasks: list[str], C: float, folds: int, seed: int) -> dict:
    """Stratified k-fold routing accuracy, overall and per task; fewer folds when a task has
    fewer prompts than `folds` (each fold must hold every task)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    used = min(folds, *(tasks.count(task) for task in set(tasks)))
    predicted = cross_val_predict(make_pipeline(*_unfitted(C)), prompts, tasks,
                                  cv=StratifiedKFold(n_splits=used, shuffle=True, random_state=seed))
    correct = predicted == np.array(tasks)
    per_task = {task: float(correct[np.array(tasks) == task].mean()) for task in dict.fromkeys(tasks)}
    return {"cv_folds": used, "cv_accuracy": float(correct.mean()), "cv_accuracy_per_task": per_task}


def _unfitted(C: float) -> tuple:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    return (TfidfVectorizer(**_sklearn_features(FEATURES)),
            LogisticRegression(C=C, class_weight="balanced", max_iter=1000))


def _sklearn_features(features: dict) -> dict:
    return {**features, "ngram_range": tuple(features["ngram_range"])}
