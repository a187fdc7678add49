"""Automatic rollback of a champion no serving worker can load.

Serving workers only report (`WorkerReport.load_failures`, every registry poll); deciding is the
control plane's: once the workers' failed loads of the champion add up to `serving.max_load_failures`,
the version is tagged broken and rolled back through `Promotions`, like any other alias move.
"""

from __future__ import annotations

import logging

from services.control.promotion import Moved, Promotions
from services.storage import Fleet

log = logging.getLogger("rankloop.control")


class ChampionWatch:
    def __init__(self, promotions: Promotions, fleet: Fleet, max_failures: int, report_age_s: float):
        self.promotions, self.fleet = promotions, fleet
        self.max_failures, self.report_age_s = max_failures, report_age_s

    def check(self) -> Moved | None:
        """One look: rolls the champion back if the workers keep failing to load it."""
        champion = self.promotions.registry.champion()
        if champion is None:
            return None
        reports = [r for r in self.fleet.reports(self.report_age_s) if r.load_failures.get(champion.version)]
        failures = sum(r.load_failures[champion.version] for r in reports)
        if failures < self.max_failures:
            return None
        error = next((r.last_swap_error for r in reports if r.last_swap_error), None) or "no error reported"
        return self.promotions.roll_back_broken(champion.version, failures, error)
