"""The online stage: offline gate -> `challenger` alias -> interleaving on live traffic -> `champion`.

Serving interleaves a nominated challenger (tagged `stage=interleaving`) with the champion on
`interleave.share` of requests; the stream labels those requests with what a like on each document
earns the challenger (its credit) and the team it goes to. Here the scheduler reads the tally from the
label table, applies the stopping rule of `training.interleave`, logs it on the challenger's MLflow
run, and promotes or withdraws the version (through `Promotions`, like every alias move).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mlflow import MlflowClient

from schemas import FIRST_STAGE, ModelEvent
from services.control.promotion import Promotions
from training.config import InterleaveConfig
from training.interleave import INTERLEAVING, STAGE_TAG, Judgement, judge, session_outcomes
from training.labels.store import LabelStore
from training.registry import ModelRegistry

log = logging.getLogger("rankloop.schedule")


@dataclass(frozen=True)
class Experiment:
    """The interleaving experiment in progress, and what was decided at this check."""

    challenger: str
    champion: str
    judgement: Judgement
    event: ModelEvent | None  # set when the challenger was promoted
    run_id: str | None = None  # the challenger's training run, where the tally is logged

    @property
    def running(self) -> bool:
        return self.judgement.verdict is None


def current_experiment(registry: ModelRegistry, labels: LabelStore, cfg: InterleaveConfig) -> Experiment | None:
    """The experiment as it stands, judged but not acted on (what `rankloop schedule status` shows);
    None while no challenger waits for interleaving (none nominated, or one awaiting a person)."""
    challenger = registry.challenger()
    version = registry.get(challenger) if challenger else None
    if challenger is None or version is None or version.tags.get(STAGE_TAG) != INTERLEAVING:
        return None
    champion = registry.champion()
    df, _ = labels.read()
    judgement = judge(session_outcomes(df, challenger, champion.version if champion else FIRST_STAGE), cfg)
    return Experiment(challenger, f"v{champion.version}" if champion else FIRST_STAGE, judgement, None, version.run_id)


def check_experiment(
    promotions: Promotions, labels: LabelStore, cfg: InterleaveConfig, client: MlflowClient | None = None
) -> Experiment | None:
    """The experiment judged and acted on: the challenger promoted or withdrawn once the rule decides."""
    found = current_experiment(promotions.registry, labels, cfg)
    if found is None:
        return None
    challenger, champion_name, judgement = found.challenger, found.champion, found.judgement
    summary = judgement.describe(challenger, champion_name)
    if client is not None and found.run_id:
        _log(client, found.run_id, judgement, summary)
    event = None
    if judgement.verdict == "challenger":
        event = promotions.promote(challenger, summary, actor="interleaving").event
        promotions.registry.tag(challenger, STAGE_TAG, "promoted by interleaving")
    elif judgement.verdict is not None:
        promotions.withdraw(challenger, summary, actor="interleaving", stage="withdrawn by interleaving")
    if judgement.verdict is not None:
        log.info("%s", summary)
    return Experiment(challenger, champion_name, judgement, event, found.run_id)


def _log(client: MlflowClient, run_id: str, j: Judgement, summary: str) -> None:
    """The tally on the challenger's run at every look (a curve over sessions) and the verdict as a tag."""
    if j.verdict is None and client.get_run(run_id).data.tags.get("interleave_look") == str(j.look):
        return  # nothing new since the last check
    client.set_tag(run_id, "interleave_look", str(j.look))
    metrics = {
        "interleave_sessions": j.sessions,
        "interleave_wins": j.tally.challenger,
        "interleave_losses": j.tally.champion,
        "interleave_ties": j.tally.ties,
        "interleave_mean_credit": j.tally.preference(),
        "interleave_p_value": j.p_value,
    }
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value), step=j.sessions)
    client.set_tag(run_id, "interleave_verdict", j.verdict or "running")
    client.set_tag(run_id, "interleave_summary", summary)
