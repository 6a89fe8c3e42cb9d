from __future__ import annotations

import itertools

import pytest

from statemachine import (
    MACHINE,
    TRANSITIONS,
    Bottle,
    BottleState,
    InvalidTransition,
    TransitionRefused,
    Trigger,
    allowed,
    fire,
)

# The lifecycle of DESIGN.md §5, written out independently of statemachine.TRANSITIONS.
Q, R, F, D = BottleState.QUEUED, BottleState.RUNNING, BottleState.FROZEN, BottleState.DESTROYED
EXPECTED = {
    (Q, Trigger.LAUNCH): R,
    (R, Trigger.DONE): F,
    (R, Trigger.EXITED): F,
    (R, Trigger.WATCHDOG): F,
    (F, Trigger.REHYDRATE): R,
    (Q, Trigger.DESTROY): D,
    (R, Trigger.DESTROY): D,
    (F, Trigger.DESTROY): D,
}
ALL_PAIRS = list(itertools.product(BottleState, Trigger))


@pytest.mark.parametrize(("state", "trigger"), ALL_PAIRS, ids=[f"{s.value}-{t.value}" for s, t in ALL_PAIRS])
def test_every_state_and_trigger(state: BottleState, trigger: Trigger) -> None:
    bottle = Bottle("b", state)
    dest = EXPECTED.get((state, trigger))
    if dest is None:
        with pytest.raises(InvalidTransition):
            fire(bottle, trigger, at="t", reason="r", free_slots=1)
        assert bottle.state is state
        assert bottle.history == []
    else:
        record = fire(bottle, trigger, at="2026-01-01T00:00:00Z", reason="because", free_slots=1)
        assert bottle.state is dest
        assert (record.trigger, record.source, record.dest) == (trigger.value, state.value, dest.value)
        assert (record.at, record.reason) == ("2026-01-01T00:00:00Z", "because")
        assert bottle.history == [record]


def test_table_matches_the_design() -> None:
    table = {(s, t): allowed(s, t) for s, t in ALL_PAIRS}
    assert {k: v for k, v in table.items() if v is not None} == EXPECTED


@pytest.mark.parametrize(("state", "trigger"), [(Q, Trigger.LAUNCH), (F, Trigger.REHYDRATE)])
def test_no_free_slot_refuses_and_changes_nothing(state: BottleState, trigger: Trigger) -> None:
    bottle = Bottle("b", state)
    with pytest.raises(TransitionRefused):
        fire(bottle, trigger, at="t", reason="r", free_slots=0)
    assert bottle.state is state
    assert bottle.history == []


def test_no_auto_transition_backdoors() -> None:
    bottle = Bottle("b", Q)
    MACHINE.add_model(bottle, initial=bottle.state)
    try:
        assert not any(hasattr(bottle, f"to_{s.name}") or hasattr(bottle, f"to_{s.value}") for s in BottleState)
    finally:
        MACHINE.remove_model(bottle)


def test_models_are_released_after_firing() -> None:
    before = len(MACHINE.models)
    fire(Bottle("b", Q), Trigger.DESTROY, at="t", reason="r")
    with pytest.raises(InvalidTransition):
        fire(Bottle("c", D), Trigger.DESTROY, at="t", reason="r")
    assert len(MACHINE.models) == before


def test_every_trigger_has_an_edge() -> None:
    assert {row["trigger"] for row in TRANSITIONS} == {t.value for t in Trigger}
