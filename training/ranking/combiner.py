"""The learned combiner: a LightGBM `lambdarank` model over every signal a candidate has, in place of
the four-number `Mix` grid (what Metarank and most learning-to-rank stacks use).

Its features are what serving computes anyway (`Reranker.features`): the first stage and its two
parts, the feedback memory at two radii, how close the nearest remembered query is, the
document's click-through prior over every remembered query, and what the corpus says of the document
(its declared number fields, its age). Scores that are evidence of relevance
are monotone (more of one never lowers a document), which keeps the model from inventing rules its
labels cannot support. The fine-tuned similarity is not among them: it was fitted on the very train
queries the combiner learns from, where it looks far better than on a new query (given the feature,
the booster put 74 % of its gain on it and lost 0.01 NDCG@10 on unseen queries), so it is blended in
after, `score = (1 - w) * minmax(booster) + w * similarity`, with w chosen on tune queries only.
A version keeps the combiner only when it beat the tuned mixes on held-out tune queries
(`training.tuning.learn_combiner`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import lightgbm as lgb
import numpy as np

from training.ranking.features import Features, memory_scores
from training.ranking.first_stage import minmax

FEATURES: dict[str, int] = {  # name -> monotone constraint (1: more never ranks lower; 0: free)
    "first_stage": 1,  # fused BM25 + dense under the learned fusion, min-max over the head
    "bm25": 1,  # min-max over the head
    "dense": 1,
    "dense_cosine": 1,  # comparable across queries, unlike the min-max scores
    "memory_near": 1,  # feedback of past queries within cosine 0.7 (paraphrases), tanh
    "memory_wide": 1,  # within cosine 0.3
    "familiarity": 0,  # cosine to the nearest remembered query (says how far to trust the memory)
    "document_prior": 1,  # tanh of the document's summed feedback over every remembered query
}
# Beside these, the corpus's own document features (`training.ranking.features.document_feature_names`:
# declared number fields, age), free of constraints: what they mean is the deployment's.
MEMORY_FEATURES = frozenset({"memory_near", "memory_wide", "familiarity", "document_prior"})
# Not learned from any more, still computed for combiners saved before: the position in the first
# stage is where clicks were shown, so a booster learning from clicks spent 29 % of its gain on it to
# explain position bias, and SciFact seed 0's v2 ranked 0.7921 with it, 0.8029 without (docs/ranking.md).
RETIRED_FEATURES = frozenset({"first_stage_rank"})
NEAR_TAU, WIDE_TAU = 0.7, 0.3
COMBINER_FILE = "combiner.txt"
WITHOUT_MEMORY_FILE = "combiner-without-memory.txt"  # the learned parts alone, for the design comparison


def feature_matrix(f: Features, names: list[str]) -> np.ndarray:
    """One row per candidate of the head, one column per name (of `FEATURES`, or a document feature)."""
    n = len(f.doc_ids)
    columns = {
        "first_stage": lambda: f.first_stage,
        "bm25": lambda: f.bm25,
        "dense": lambda: f.dense,
        "dense_cosine": lambda: f.dense_cosine,
        "first_stage_rank": lambda: np.arange(n) / max(1, n),
        "memory_near": lambda: np.tanh(memory_scores(f, NEAR_TAU)),
        "memory_wide": lambda: np.tanh(memory_scores(f, WIDE_TAU)),
        "familiarity": lambda: np.full(n, float(f.neighbours[0]) if len(f.neighbours) else 0.0),
        "document_prior": lambda: np.tanh(f.document_prior),
    }
    missing = np.full(n, np.nan)  # a document feature the corpus no longer has (a field undeclared)

    def column(name: str) -> np.ndarray:
        return np.asarray(columns[name]() if name in columns else f.documents.get(name, missing), dtype=np.float64)

    return np.column_stack([column(name) for name in names]) if n else np.zeros((0, len(names)))


@dataclass(frozen=True)
class Combiner:
    """A trained lambdarank booster, the features it reads (in order) and the weight of the
    fine-tuned similarity blended with its min-max scaled output."""

    booster: lgb.Booster
    names: list[str]
    similarity_weight: float = 0.0

    def score(self, f: Features) -> np.ndarray:
        if not f.doc_ids:
            return np.zeros(0)
        learned = minmax(np.asarray(self.booster.predict(feature_matrix(f, self.names), num_threads=1), dtype=np.float64))
        return (1 - self.similarity_weight) * learned + self.similarity_weight * f.similarity

    @property
    def document_features(self) -> list[str]:
        """The corpus features it reads (`Reranker.features` looks them up only then)."""
        return [n for n in self.names if n not in FEATURES and n not in RETIRED_FEATURES]

    def with_similarity(self, weight: float) -> Combiner:
        return replace(self, similarity_weight=weight)

    def save(self, path: Path) -> None:
        self.booster.save_model(str(path))
        path.with_suffix(".json").write_text(json.dumps({"features": self.names, "similarity_weight": self.similarity_weight}))

    @classmethod
    def load(cls, path: Path) -> Combiner:
        meta = json.loads(path.with_suffix(".json").read_text())
        return cls(lgb.Booster(model_file=str(path)), meta["features"], float(meta.get("similarity_weight", 0.0)))

    def importance(self) -> dict[str, float]:
        """Total gain per feature, as shares (what the model card and MLflow show)."""
        gain = self.booster.feature_importance(importance_type="gain")
        total = float(gain.sum()) or 1.0
        return {n: round(float(g) / total, 4) for n, g in zip(self.names, gain)}


def train_combiner(groups: list[tuple[Features, dict[str, int]]], names: list[str], seed: int, rounds: int = 150) -> Combiner:
    """Lambdarank on one group per query: its head's features and its graded relevance (doc -> grade;
    every other candidate 0). Small trees, many rows per leaf, monotone evidence, one thread."""
    x = np.vstack([feature_matrix(f, names) for f, _ in groups])
    y = np.concatenate([[grades.get(d, 0) for d in f.doc_ids] for f, grades in groups])
    params = {
        "objective": "lambdarank",
        "lambdarank_truncation_level": 20,
        "label_gain": [0, 1, 3],
        "learning_rate": 0.05,
        "num_leaves": 7,
        "min_data_in_leaf": 20,
        "feature_fraction": 0.9,
        "monotone_constraints": [FEATURES.get(n, 0) for n in names],
        "num_threads": 1,
        "deterministic": True,
        "seed": seed,
        "verbose": -1,
    }
    data = lgb.Dataset(x, y, group=[len(f.doc_ids) for f, _ in groups], feature_name=names)
    return Combiner(lgb.train(params, data, num_boost_round=rounds), names)
