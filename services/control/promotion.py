"""Which version serves: the one module that moves the registry's aliases and announces the move.

Every change of `champion`, `previous` and `challenger` goes through `Promotions`: a promotion (by a
person, by the scheduler after the gate, by interleaving), an approval, a rollback (by a person, or
automatic when no serving worker can load the champion), a nomination and a withdrawal. Each one is

1. moved in the registry (MLflow aliases: `MlflowAliases` is the only code that writes them),
2. audited on the version (`<action>_by`, `<action>_at`, `<action>_reason` tags, shown in MLflow),
3. announced with a model event on `<deployment>.model-events`, which tells every serving worker to
   look at the registry now.

One error policy for all of them: a version that does not exist is `NotFound`, a move that makes no
sense (already the champion, nothing to roll back to, not awaiting approval) is `InvalidState`, a
registry that cannot be reached is `DependencyUnavailable` with nothing moved. An announcement that
fails is logged and reported in `Moved.announced`, never raised: the alias has moved, and serving
workers also poll it (`serving.champion_poll_s`), so a lost event only delays the swap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from schemas import DependencyUnavailable, InvalidState, ModelEvent, RankloopError
from services.config import Settings
from services.storage import Publisher, open_publisher, open_registry
from training.interleave import INTERLEAVING, STAGE_TAG
from training.registry import CHALLENGER, CHAMPION, PREVIOUS, MlflowRegistry, ModelRegistry

log = logging.getLogger("rankloop.control")
T = TypeVar("T")
AfterGate = Literal["promote", "interleave", "await approval"]
"""What becomes of a version that passed the gate (`Promotions.policy`)."""


class Aliases(Protocol):
    """Writes a registered model's aliases (MLflow's, or `MemoryRegistry`'s in unit tests)."""

    def set_alias(self, alias: str, version: str) -> None: ...
    def delete_alias(self, alias: str) -> None: ...


class MlflowAliases:
    """The MLflow registry's aliases of one registered model."""

    def __init__(self, registry: MlflowRegistry):
        self.client, self.name = registry.client, registry.name

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, str(version))

    def delete_alias(self, alias: str) -> None:
        self.client.delete_registered_model_alias(self.name, alias)


@dataclass(frozen=True)
class Moved:
    event: ModelEvent
    announced: bool  # the model event reached the broker (workers also poll, so False only delays the swap)


class Promotions:
    """The one owner of alias moves and model events (see the module's docstring)."""

    def __init__(
        self,
        registry: ModelRegistry,
        aliases: Aliases,
        publisher: Publisher,
        topic: str,
        where: str = "the model registry",
        announce_timeout_s: float = 10.0,
    ):
        self.registry, self.aliases, self.publisher, self.topic = registry, aliases, publisher, topic
        self.where, self.announce_timeout_s = where, announce_timeout_s

    @classmethod
    def connect(cls, s: Settings, registry: MlflowRegistry | None = None, publisher: Publisher | None = None) -> Promotions:
        """On the deployment's MLflow registry, announcing on its broker."""
        registry = registry or open_registry(s)
        publisher = publisher or open_publisher(s.kafka.address)
        where = f"the model registry (MLflow at {s.tracking_uri})"
        return cls(registry, MlflowAliases(registry), publisher, s.keys.model_events, where)

    @staticmethod
    def policy(auto_promote: bool, interleave_share: float) -> AfterGate:
        """The deployment's rule for a version that passed the gate (`retrain.auto_promote`, `interleave.share`)."""
        if not auto_promote:
            return "await approval"
        return "interleave" if interleave_share > 0 else "promote"

    # ---- moves ---------------------------------------------------------------------------
    def promote(self, version: str, reason: str, actor: str) -> Moved:
        """Makes `version` the champion; the champion it replaces becomes `previous` (what a rollback
        brings back), and a `challenger` alias on it is cleared."""
        version = str(version)

        def move() -> ModelEvent:
            current = self.registry.champion()
            if current and current.version == version:
                raise InvalidState(f"version {version} is already the champion")
            self.registry.get(version)  # NotFound before anything moves
            if current:
                self.aliases.set_alias(PREVIOUS, current.version)
            self.aliases.set_alias(CHAMPION, version)
            if self.registry.challenger() == version:
                self.aliases.delete_alias(CHALLENGER)
            self._audit(version, "promoted", reason, actor)
            return self._event("promoted", version, current.version if current else None, reason, actor)

        return self._announce(self._registry(move))

    def approve(self, version: str, reason: str, actor: str) -> Moved:
        """Promotes the challenger awaiting approval; refuses any other version, so an approval is
        always of what the gate passed (`promote` moves any version, deliberately)."""
        waiting = self._registry(self.registry.challenger)
        if waiting != str(version):
            raise InvalidState(
                f"version {version} is not awaiting approval (the challenger is {waiting or 'none'}); "
                "`rankloop promote` moves any version"
            )
        return self.promote(str(version), f"approved: {reason}", actor)

    def rollback(self, reason: str, actor: str) -> Moved:
        """Puts `previous` back as champion (audited on the version rolled back)."""

        def move() -> ModelEvent:
            current = self.registry.champion()
            previous = self.registry.previous()
            if previous is None:
                raise InvalidState(f"model {self.registry.name!r} has no `previous` version to roll back to")
            self.aliases.set_alias(CHAMPION, previous)
            self.aliases.delete_alias(PREVIOUS)
            if current:
                self._audit(current.version, "rolled_back", reason, actor)
            return self._event("rolled_back", previous, current.version if current else None, reason, actor)

        return self._announce(self._registry(move))

    def nominate(self, version: str, reason: str, actor: str, stage: str | None = None) -> None:
        """Puts `challenger` on `version`: it passed the gate and waits for interleaving (`stage`
        INTERLEAVING: serving workers interleave it with the champion) or for a person's approval."""

        def move() -> None:
            self.registry.get(str(version))
            self.aliases.set_alias(CHALLENGER, str(version))
            if stage:
                self.registry.tag(str(version), STAGE_TAG, stage)
            self._audit(str(version), "nominated", reason, actor)

        self._registry(move)
        self._announce_quietly(version, "nominated", reason, actor)

    def withdraw(self, version: str, reason: str, actor: str, stage: str | None = None) -> None:
        """Takes `challenger` off `version` (interleaving found it no better), saying why on the version."""

        def move() -> None:
            if self.registry.challenger() == str(version):
                self.aliases.delete_alias(CHALLENGER)
            if stage:
                self.registry.tag(str(version), STAGE_TAG, stage)
            self._audit(str(version), "withdrawn", reason, actor)

        self._registry(move)
        self._announce_quietly(version, "withdrawn", reason, actor)

    def after_gate(self, version: str, reason: str, policy: AfterGate, actor: str = "scheduler") -> str:
        """What becomes of a version that passed the gate, under the deployment's policy; returns its
        fate as the run and the version's card say it: promoted, interleaving or awaiting approval."""
        if policy == "promote":
            self.promote(version, reason, actor)
            return "promoted"
        if policy == "interleave":
            self.nominate(version, reason, actor, stage=INTERLEAVING)
            return INTERLEAVING
        self.nominate(version, reason, actor)
        return "awaiting approval"

    def roll_back_broken(self, version: str, failures: int, error: str) -> Moved | None:
        """A champion the serving workers failed to load `failures` times: tagged broken and rolled
        back to `previous`, so no replica stays behind a model none can load. None when it is no
        longer the champion (a person moved it) or there is nothing to roll back to (it stays tagged,
        and serving stays not ready, saying why)."""
        self._registry(lambda: self.registry.tag(version, "broken", f"failed to load {failures} times: {error}"[:500]))
        champion = self._registry(self.registry.champion)
        if champion is None or champion.version != version:
            return None
        try:
            moved = self.rollback(f"automatic: version {version} failed to load {failures} times", actor="control")
        except InvalidState as e:
            log.error("version %s is broken and cannot be rolled back: %s", version, e)
            return None
        log.error("version %s failed to load %d times: tagged broken, rolled back to %s", version, failures, moved.event.version)
        return moved

    # ---- one error policy ----------------------------------------------------------------
    def _registry(self, call: Callable[[], T]) -> T:
        """Runs registry reads and writes: our own errors pass through, anything else means the
        registry could not be reached (or refused), and is said so."""
        try:
            return call()
        except RankloopError:
            raise
        except Exception as e:  # MlflowException, a refused connection, a timeout
            raise DependencyUnavailable(f"{self.where} cannot be reached: {e}") from e

    def _audit(self, version: str, action: str, reason: str, actor: str) -> None:
        """Who moved the model, when and why, on the version itself (shown in MLflow's UI)."""
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for key, value in ((f"{action}_by", actor), (f"{action}_at", when), (f"{action}_reason", reason)):
            self.registry.tag(version, key, value)

    def _event(self, action: str, version: str, previous: str | None, reason: str, actor: str) -> ModelEvent:
        return ModelEvent(
            action=action, model_name=self.registry.name, version=version, previous_version=previous, reason=reason, actor=actor
        )

    def _announce(self, event: ModelEvent) -> Moved:
        """The model event on the broker, waited for: the caller learns whether it was announced."""
        try:
            future = self.publisher.publish(self.topic, event.model_name, event)
            if future is None:
                raise DependencyUnavailable(self.publisher.last_error or "the broker refused it")
            self.publisher.flush(timeout=self.announce_timeout_s)
            future.result(timeout=self.announce_timeout_s)
        except Exception as e:  # the alias moved: serving picks it up by polling
            log.warning("version %s %s, but the model event was not published (%s): workers see it at their next poll",
                        event.version, event.action, e)  # fmt: skip
            return Moved(event, announced=False)
        log.info("version %s %s by %s: %s", event.version, event.action, event.actor, event.reason)
        return Moved(event, announced=True)

    def _announce_quietly(self, version: str, action: str, reason: str, actor: str) -> None:
        """A nomination or withdrawal changes what serving interleaves: announced like a promotion."""
        champion = self._registry(self.registry.champion)
        self._announce(self._event(action, str(version), champion.version if champion else None, reason, actor))
