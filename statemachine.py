"""The pure core of forgebottle: bottle states, the transition table, domain errors.

No I/O lives here. The service loads a :class:`Bottle` from the store, asks the one
:data:`MACHINE` to fire a trigger, and persists the :class:`TransitionRecord` the
machine appended to ``bottle.history``.

Error hierarchy (every error forgebottle raises on purpose derives from the root)::

    ForgeBottleError                 http 500, rpc -32603
    ├── LifecycleError               http 409
    │   ├── InvalidTransition        trigger not allowed from the current state
    │   └── TransitionRefused        a guard said no (e.g. no free slot)
    └── (gitea.py, forgebottle.py add the forge, config, sidecar and CLI errors)

Each class carries the status it maps to at every edge (HTTP, JSON-RPC, CLI), so the
edges map errors in exactly one place.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Any, ClassVar

from transitions import EventData, Machine, MachineError

# model_override=True makes transitions log a warning for every convenience method it
# chooses not to bind (is_QUEUED, ...). That is the behaviour we want, not news.
logging.getLogger("transitions").setLevel(logging.ERROR)


class ForgeBottleError(Exception):
    """Root of every error forgebottle raises deliberately."""

    http_status: ClassVar[int] = 500
    rpc_code: ClassVar[int] = -32603
    exit_code: ClassVar[int] = 1


class LifecycleError(ForgeBottleError):
    http_status = 409


class InvalidTransition(LifecycleError):
    """The trigger has no edge from the bottle's current state."""


class TransitionRefused(LifecycleError):
    """The edge exists but a guard refused it (for example: no free slot)."""


class BottleState(enum.Enum):
    """Where a bottle is in its life. SQLite stores ``.value``."""

    QUEUED = "queued"  # accepted, waiting for a free slot
    RUNNING = "running"  # agent process alive, sidecar socket open
    FROZEN = "frozen"  # agent stopped, workspace kept, waiting for a prompt
    DESTROYED = "destroyed"  # PR closed or destroyed by hand; record kept, workspace gone

    @property
    def live(self) -> bool:
        return self is not BottleState.DESTROYED


class Trigger(enum.Enum):
    LAUNCH = "launch"
    DONE = "done"
    EXITED = "exited"
    WATCHDOG = "watchdog"
    REHYDRATE = "rehydrate"
    DESTROY = "destroy"


_Q, _R, _F, _D = BottleState.QUEUED, BottleState.RUNNING, BottleState.FROZEN, BottleState.DESTROYED

# The whole lifecycle (DESIGN.md §5). No other edge exists: auto_transitions is off.
TRANSITIONS: list[dict[str, Any]] = [
    {"trigger": Trigger.LAUNCH.value, "source": _Q, "dest": _R, "conditions": "slot_free"},
    {"trigger": Trigger.DONE.value, "source": _R, "dest": _F},
    {"trigger": Trigger.EXITED.value, "source": _R, "dest": _F},
    {"trigger": Trigger.WATCHDOG.value, "source": _R, "dest": _F},
    {"trigger": Trigger.REHYDRATE.value, "source": _F, "dest": _R, "conditions": "slot_free"},
    {"trigger": Trigger.DESTROY.value, "source": [_Q, _R, _F], "dest": _D},
]


def allowed(state: BottleState, trigger: Trigger) -> BottleState | None:
    """The destination of ``trigger`` from ``state`` per the table, or None."""
    for row in TRANSITIONS:
        sources = row["source"] if isinstance(row["source"], list) else [row["source"]]
        if row["trigger"] == trigger.value and state in sources:
            dest: BottleState = row["dest"]
            return dest
    return None


def branch_for(issue: int) -> str:
    """The one branch a bottle may push to and open a pull request from."""
    return f"bot-bottle/issue-{issue}"


@dataclasses.dataclass(frozen=True)
class TransitionRecord:
    at: str
    trigger: str
    source: str
    dest: str
    reason: str


@dataclasses.dataclass
class Bottle:
    """The machine's model: one bottle's identity and state.

    The trigger methods below are typed stubs; ``model_override=True`` makes the machine
    bind exactly these, so mypy sees what runs.
    """

    slug: str
    state: BottleState
    history: list[TransitionRecord] = dataclasses.field(default_factory=list)

    # -- guards and callbacks (pure) -------------------------------------------------

    def slot_free(self, event: EventData) -> bool:
        free: int = event.kwargs.get("free_slots", 0)
        return free > 0

    def record(self, event: EventData) -> None:
        assert event.transition is not None
        self.history.append(
            TransitionRecord(
                # transitions keys enum states by member name
                at=str(event.kwargs["at"]),
                trigger=event.event.name,
                source=BottleState[str(event.transition.source)].value,
                dest=BottleState[str(event.transition.dest)].value,
                reason=str(event.kwargs.get("reason", "")),
            )
        )

    # -- trigger stubs, replaced by the machine ------------------------------------

    def launch(self, **kwargs: Any) -> bool:
        raise NotImplementedError

    def done(self, **kwargs: Any) -> bool:
        raise NotImplementedError

    def exited(self, **kwargs: Any) -> bool:
        raise NotImplementedError

    def watchdog(self, **kwargs: Any) -> bool:
        raise NotImplementedError

    def rehydrate(self, **kwargs: Any) -> bool:
        raise NotImplementedError

    def destroy(self, **kwargs: Any) -> bool:
        raise NotImplementedError

    def trigger(self, name: str, **kwargs: Any) -> bool:
        raise NotImplementedError


MACHINE = Machine(
    model=None,
    states=BottleState,
    transitions=TRANSITIONS,
    initial=None,
    auto_transitions=False,
    model_override=True,
    send_event=True,
    after_state_change="record",
)


def fire(bottle: Bottle, trigger: Trigger, *, at: str, reason: str, free_slots: int = 0) -> TransitionRecord:
    """Fire ``trigger`` on ``bottle`` and return the record of the transition.

    Raises :class:`InvalidTransition` when the table has no such edge (the bottle is left
    unchanged) and :class:`TransitionRefused` when a guard says no.
    """
    MACHINE.add_model(bottle, initial=bottle.state)
    try:
        ok = bottle.trigger(trigger.value, at=at, reason=reason, free_slots=free_slots)
    except MachineError as exc:
        raise InvalidTransition(f"{bottle.slug}: cannot {trigger.value} a {bottle.state.value} bottle") from exc
    finally:
        MACHINE.remove_model(bottle)
    if not ok:
        raise TransitionRefused(f"{bottle.slug}: {trigger.value} refused: no free slot")
    return bottle.history[-1]
