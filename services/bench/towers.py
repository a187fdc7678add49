"""`rankloop bench towers`: what freezing the document tower costs in quality, and what it saves.

The same full-information training (the dataset's train qrels as labels, as the loop benchmark's
skyline) is run once per `train.document_tower`, and each version is evaluated on the eval split
as served (with its feedback memory) and without the memory (the learned part alone); beside it,
the seconds the training took and the seconds a worker needs before it can serve the version
(`Reranker.warm`: nothing for a frozen tower, every document embedded for a tuned one).
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console

from services.bench.loop import _qrels_labels, retrain_side
from services.cli.progress import ProgressBar
from services.config import Settings
from services.storage import open_registry
from services.storage.memory import MemoryLabelStore
from training import beir
from training.evaluate import evaluate_designs, evaluate_first_stage_parts, evaluate_ranker
from training.indexing import build_index
from training.ranking.embedding_cache import MemoryEmbeddingCache
from training.ranking.first_stage import FirstStage
from training.ranking.rank import candidates_for
from training.ranking.reranker import Reranker
from training.registry import MlflowRegistry
from training.tuning import NO_MEMORY

console = Console()


class TowerResult(BaseModel):
    document_tower: str
    eval_ndcg_at_10: float  # as served: learned parts + feedback memory
    eval_ndcg_at_10_without_memory: float  # the learned parts alone (`NO_MEMORY` of `evaluate_designs`)
    train_and_gate_s: float
    ready_to_serve_s: float  # loading the version and `warm` (what a promotion waits for)
    mix: dict


class TowersResult(BaseModel):
    dataset: str
    eval_split: str
    train_split: str
    documents: int
    first_stage_ndcg_at_10: float
    towers: list[TowerResult]


def run_towers_bench(s: Settings, train_split: str, eval_split: str, out: Path) -> TowersResult:
    ds = beir.load(s.dataset, s.state_dir / "datasets")
    with ProgressBar(console) as progress:
        build_index(ds, s.state_dir, progress=progress)
    fs = FirstStage.current(s.state_dir)
    depth = s.serving.rerank_depth
    cands = candidates_for(fs, [ds.queries[q] for q in ds.qrels(eval_split)])
    first = evaluate_first_stage_parts(ds, eval_split, cands)["hybrid"]["ndcg@10"]
    registry = open_registry(s)
    labels = _qrels_labels(ds, train_split, fs.version)
    rows = []
    for tower in ("frozen", "tuned"):
        reg = MlflowRegistry(registry.client, f"{s.deployment}-{tower}", s.versions_dir / f"{s.deployment}-{tower}")
        cfg = s.train.model_copy(update={"debias": "naive", "document_tower": tower})
        started = time.time()
        outcome = retrain_side(reg, MemoryLabelStore(labels), fs, s.model_copy(update={"train": cfg}), depth)
        trained = time.time() - started
        started = time.time()
        reranker = Reranker(reg.fetch(reg.get(str(outcome.version))), str(outcome.version), MemoryEmbeddingCache()).warm(fs)
        ready = time.time() - started
        served = evaluate_ranker(ds, eval_split, cands, reranker, fs.text, depth)["ndcg@10"]
        alone = evaluate_designs(ds, eval_split, cands, reranker, fs.text, depth)[NO_MEMORY]["ndcg@10"]
        rows.append(
            TowerResult(
                document_tower=tower,
                eval_ndcg_at_10=round(served, 4),
                eval_ndcg_at_10_without_memory=round(alone, 4),
                train_and_gate_s=round(trained, 1),
                ready_to_serve_s=round(ready, 2),
                mix=reranker.mix.as_dict(),
            )
        )
        console.print(
            f"{tower}: {eval_split} NDCG@10 {served:.4f} ({alone:.4f} without memory), "
            f"trained in {trained:.0f} s, ready in {ready:.1f} s"
        )
    result = TowersResult(
        dataset=ds.name,
        eval_split=eval_split,
        train_split=train_split,
        documents=fs.count(),
        first_stage_ndcg_at_10=round(first, 4),
        towers=rows,
    )
    out.write_text(result.model_dump_json(indent=2))
    return result
