"""POST /rank and GET /model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from schemas import ErrorBody, ModelInfo, RankRequest, RankResponse
from schemas.api import RerankRequest
from services.auth import ApiKey, Scope
from services.http import BAD_BODY, NO_KEY, caller, client_network
from services.serve.deps import WorkerDep, rank_limit

router = APIRouter()
LIMITED: dict[int | str, dict[str, Any]] = {429: {"model": ErrorBody, "description": "rate limit exceeded; see Retry-After"}}
NEW_IDENTITIES: dict[int | str, dict[str, Any]] = {
    429: {"model": ErrorBody, "description": "rate limit, or auth.new_identities_per_min, exceeded; see Retry-After"}
}


@router.post(
    "/rank",
    response_model=RankResponse,
    responses={
        **BAD_BODY,
        422: {"description": "invalid request, or a user_token that does not verify"},
        **NO_KEY,
        **NEW_IDENTITIES,
    },
    dependencies=[Depends(rank_limit)],
)
def rank(req: RankRequest, request: Request, worker: WorkerDep, key: ApiKey | None = Depends(caller(Scope.rank))) -> RankResponse:
    """Ranked documents for a query; every answer is recorded as an impression (with the key's name,
    whether `user` was signed, and the caller's network)."""
    return worker.rank(req, key.name if key else None, client_network(request, worker.s.auth.trusted_proxies))


@router.post(
    "/rerank",
    response_model=RankResponse,
    responses={
        **BAD_BODY,
        422: {"description": "invalid request, a candidate id not in the index, or a user_token that does not verify"},
        **NO_KEY,
        **NEW_IDENTITIES,
    },
    dependencies=[Depends(rank_limit)],
)
def rerank(
    req: RerankRequest, request: Request, worker: WorkerDep, key: ApiKey | None = Depends(caller(Scope.rank))
) -> RankResponse:
    """The application's own candidates (indexed ids, or inline documents) in the served model's
    order; recorded as an impression like /rank, so clicks on it train the next version."""
    return worker.rerank(req, key.name if key else None, client_network(request, worker.s.auth.trusted_proxies))


@router.get("/model", response_model=ModelInfo, responses=NO_KEY, dependencies=[Depends(caller(Scope.rank))])
def model(worker: WorkerDep) -> ModelInfo:
    """The model version served now, its score mix and the last failed swap."""
    sv = worker.serving
    return ModelInfo(
        model_version=sv.version,
        index_version=worker.first_stage.version,
        mix=sv.reranker.mix.as_dict() if sv.reranker else None,
        unfamiliar_mix=sv.reranker.unfamiliar_mix.as_dict() if sv.reranker and sv.reranker.unfamiliar_mix else None,
        scorer="first stage" if sv.reranker is None else "combiner" if sv.reranker.combiner else "mix",
        loaded_at=sv.loaded_at,
        model_name=worker.keys.model_name,
        last_swap_error=worker.last_swap_error,
    )
