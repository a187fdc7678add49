"""A version folder is also an MLflow pyfunc model (its `MLmodel` names this loader module; no pickle).

`mlflow.pyfunc.load_model("models:/rankloop-reranker@champion").predict(df)`, with columns `query` and
`document` (the document's text), gives the fine-tuned bi-encoder's relevance, the cosine of the two
embeddings, per row: the model half of the score serving mixes with the first stage (docs/ranking.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from training.ranking.encoder import encode, load_encoder


class BiEncoderScorer:
    def __init__(self, folder: Path):
        self.model = load_encoder(folder)

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        queries = encode(self.model, [str(q) for q in model_input["query"]])
        docs = encode(self.model, [str(d) for d in model_input["document"]])
        return (queries * docs).sum(axis=1).astype(np.float64)


def _load_pyfunc(data_path: str) -> BiEncoderScorer:
    """MLflow's entry point: `data_path` is the version folder itself."""
    return BiEncoderScorer(Path(data_path))
