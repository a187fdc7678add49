"""The one owner of alias moves: every move audited and announced, one error policy, the deployment's
rule for a version that passed the gate."""

from __future__ import annotations

import json

import pytest

from schemas import DependencyUnavailable, InvalidState, NotFound
from services.control.promotion import Promotions
from services.storage.memory import MemoryPublisher
from tests.factories import promotions_on
from training.interleave import INTERLEAVING, STAGE_TAG
from training.registry import MemoryRegistry


def registry_with(n: int) -> tuple[MemoryRegistry, list[str]]:
    registry = MemoryRegistry()
    return registry, [registry.add(f"/v{i}") for i in range(n)]


def events(promotions: Promotions) -> list[dict]:
    return [json.loads(p) for p in promotions.publisher.on(promotions.topic)]  # type: ignore[attr-defined]


def test_a_promotion_moves_champion_and_previous_audits_and_announces():
    registry, (a, b) = registry_with(2)
    promotions = promotions_on(registry)
    promotions.promote(a, "first", actor="cli:ops")
    moved = promotions.promote(b, "better", actor="scheduler")
    assert moved.announced and (moved.event.version, moved.event.previous_version) == (b, a)
    assert registry.champion().version == b and registry.previous() == a
    assert registry.tags[b]["promoted_by"] == "scheduler" and registry.tags[b]["promoted_reason"] == "better"
    assert [e["action"] for e in events(promotions)] == ["promoted", "promoted"]


def test_moves_that_make_no_sense_are_refused_before_anything_moves():
    registry, (a,) = registry_with(1)
    promotions = promotions_on(registry)
    with pytest.raises(NotFound):
        promotions.promote("99", "typo", actor="cli:ops")
    with pytest.raises(InvalidState, match="no `previous`"):
        promotions.rollback("nothing to go back to", actor="cli:ops")
    promotions.promote(a, "first", actor="cli:ops")
    with pytest.raises(InvalidState, match="already the champion"):
        promotions.promote(a, "again", actor="cli:ops")
    assert registry.aliases == {"champion": a} and len(events(promotions)) == 1


def test_a_registry_that_cannot_be_reached_is_one_error_naming_it():
    registry, (a,) = registry_with(1)
    promotions = Promotions(registry, registry, MemoryPublisher(), "events", where="the model registry (MLflow at http://x)")

    def down(*args: object) -> None:
        raise ConnectionError("connection refused")

    registry.champion = down  # type: ignore[method-assign]
    with pytest.raises(DependencyUnavailable, match=r"MLflow at http://x\) cannot be reached: connection refused"):
        promotions.promote(a, "now", actor="cli:ops")


def test_an_announcement_the_broker_refused_is_reported_and_the_move_stands():
    registry, (a,) = registry_with(1)
    publisher = MemoryPublisher()
    publisher.fail = True
    moved = Promotions(registry, registry, publisher, "events").promote(a, "now", actor="cli:ops")
    assert not moved.announced and registry.champion().version == a  # workers see it at their next poll


@pytest.mark.parametrize(
    ("auto_promote", "share", "fate", "champion", "challenger"),
    [(True, 0.0, "promoted", "1", None), (True, 0.2, INTERLEAVING, None, "1"), (False, 0.2, "awaiting approval", None, "1")],
)
def test_a_version_that_passed_the_gate_meets_the_deployments_policy(auto_promote, share, fate, champion, challenger):
    registry, (a,) = registry_with(1)
    promotions = promotions_on(registry)
    assert promotions.after_gate(a, "better by +0.03", Promotions.policy(auto_promote, share)) == fate
    assert (registry.champion().version if registry.champion() else None) == champion
    assert registry.challenger() == challenger
    assert (registry.tags[a].get(STAGE_TAG) == INTERLEAVING) == (fate == INTERLEAVING)  # only then do workers interleave it


def test_a_broken_champion_is_tagged_and_rolled_back_unless_a_person_moved_it_already():
    registry, (good, broken, other) = registry_with(3)
    promotions = promotions_on(registry)
    promotions.promote(good, "good", actor="test")
    promotions.promote(broken, "bad", actor="test")
    moved = promotions.roll_back_broken(broken, 3, "truncated safetensors")
    assert moved is not None and registry.champion().version == good and "truncated" in registry.tags[broken]["broken"]
    promotions.promote(other, "a person moved on", actor="cli:ops")
    assert promotions.roll_back_broken(broken, 4, "still broken") is None and registry.champion().version == other


def test_a_broken_first_champion_stays_tagged_with_nothing_to_roll_back_to():
    registry, (broken,) = registry_with(1)
    promotions = promotions_on(registry)
    promotions.promote(broken, "bad", actor="test")
    assert promotions.roll_back_broken(broken, 3, "truncated") is None
    assert registry.champion().version == broken and "broken" in registry.tags[broken]
