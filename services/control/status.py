"""`GET /status` of the control process: one HTML page an operator opens to see the loop at work,
rendered on the server (no script, no external asset): what each serving worker serves, the schedule,
the model history, recent trainings with their metric by round, events and labels per minute, dead
letters by reason and the newest ones.

Figures are read, never assumed: a source that cannot be read (MLflow, Redis) shows as unavailable
with its error, not as zeros."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from mlflow import MlflowClient

from schemas import DeadLetter
from services.control.schedule import ScheduleStatus
from services.storage import WorkerReport
from training.registry import ModelVersion

TEMPLATES = Path(__file__).parent / "templates"
MINUTES = 60
RUNS = 10
env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))


@dataclass
class Training:
    name: str
    started: float
    seconds: float | None
    outcome: str
    gain: float | None
    p_value: float | None
    labels: int | None


@dataclass
class StatusPage:
    deployment: str
    auth: str  # "keys" or "open"
    report_age_s: float  # a worker that has not reported for this long is gone
    workers: list[WorkerReport] | None = None  # None: not read (Redis)
    schedule: ScheduleStatus | None = None
    versions: list[ModelVersion] = field(default_factory=list)
    trainings: list[Training] | None = None  # None: not read (no MLflow)
    rounds: dict[str, list] | None = None  # metric_by_round.json of the newest run
    minutes: list[tuple[int, dict[str, int]]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # sources that could not be read

    def render(self) -> str:
        per_minute = [(m, c.get("events", 0), c.get("labels", 0)) for m, c in self.minutes]
        dead_by_code: dict[str, int] = {}
        for _, counts in self.minutes:
            for k, v in counts.items():
                if k.startswith("dead:"):
                    dead_by_code[k[5:]] = dead_by_code.get(k[5:], 0) + v
        return env.get_template("status.html").render(
            page=self,
            now=time.time(),
            per_minute=per_minute,
            bars=bars(per_minute),
            rounds_chart=rounds_chart(self.rounds) if self.rounds else None,
            dead_by_code=sorted(dead_by_code.items(), key=lambda kv: -kv[1]),
            when=lambda t: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "-",
        )


def read_trainings(client: MlflowClient, experiment: str) -> tuple[list[Training], dict[str, list] | None]:
    """The newest training runs and the newest run's metric by round."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return [], None
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=RUNS)
    out = []
    for r in runs:
        m, end = r.data.metrics, r.info.end_time
        out.append(
            Training(
                name=r.info.run_name or r.info.run_id,
                started=r.info.start_time / 1000,
                seconds=(end - r.info.start_time) / 1000 if end else None,
                outcome=r.data.tags.get("outcome", "running" if not end else "unknown"),
                gain=m.get("gate_gain"),
                p_value=m.get("gate_p_value"),
                labels=int(m["labels"]) if "labels" in m else None,
            )
        )
    rounds = None
    for r in runs:
        try:
            path = client.download_artifacts(r.info.run_id, "metric_by_round.json")
        except Exception:  # a skipped or failed run has none: look further back
            continue
        rounds = json.loads(Path(path).read_text())
        break
    return out, rounds


def bars(per_minute: list[tuple[int, int, int]], width: int = 600, height: int = 120) -> dict[str, Any]:
    """Bar geometry for events and labels per minute (SVG user units)."""
    top = max([max(e, lab) for _, e, lab in per_minute] + [1])
    step = width / max(1, len(per_minute))
    rects = []
    for i, (_, events, labels) in enumerate(per_minute):
        for j, (value, kind) in enumerate(((events, "events"), (labels, "labels"))):
            h = height * value / top
            rects.append({"x": round(i * step + j * step / 2, 1), "y": round(height - h, 1), "w": round(step / 2, 1),
                          "h": round(h, 1), "kind": kind, "value": value})  # fmt: skip
    return {"width": width, "height": height, "top": top, "rects": rects}


def rounds_chart(rounds: dict[str, list], width: int = 600, height: int = 160) -> dict[str, Any]:
    """Polylines of champion and challenger NDCG@10 by round, promoted rounds marked."""
    champion, challenger = rounds.get("champion_ndcg@10", []), rounds.get("challenger_ndcg@10", [])
    values = champion + challenger
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    lo, hi = lo - 0.01, hi + 0.01
    n = max(len(challenger), 1)

    def point(i: int, v: float) -> tuple[float, float]:
        x = 20 + (width - 40) * (i / max(1, n - 1))
        return round(x, 1), round(height - 10 - (height - 20) * (v - lo) / (hi - lo), 1)

    points = lambda vs: [point(i, v) for i, v in enumerate(vs)]  # noqa: E731
    line = lambda vs: " ".join(f"{x},{y}" for x, y in points(vs))  # noqa: E731
    promoted = [point(i, v) for i, (v, p) in enumerate(zip(challenger, rounds.get("promoted", []))) if p]
    return {"width": width, "height": height, "champion": line(champion), "challenger": line(challenger),
            "champion_points": points(champion), "challenger_points": points(challenger),
            "promoted": promoted, "lo": lo, "hi": hi, "rounds": n}  # fmt: skip
