"""Hierarchical temporal aggregation (docs/science.md §3): compose models of several step lengths for any lead.

**Greedy schedule.** With models for steps Δ ∈ S (hours, e.g. {1, 3, 6, 24}), lead T is reached by
as many calls of the largest step as fit, then of the next one, and so on:
56 h = 24 + 24 + 6 + 1 + 1 (5 calls), 71 h = 24 + 24 + 6 + 6 + 6 + 3 + 1 + 1 (8), 72 h = 3 × 24.

**Anchor states for every-step output.** The state at lead L is *defined* as the end of L's greedy
call sequence. A prefix of a greedy sequence is itself the greedy sequence of its partial sum, so
the state of every lead reached along the way is an anchor that later leads reuse: the 24 h model
runs 0 → 24 → 48 → …, and the 6 h model starts from the latest 24 h anchor (54 h = anchor 48 h + 6 h,
60 h = the 54 h state + 6 h). Output every 6 h to 10 days with {6, 24} h costs one call per output
lead (40 calls) and every output keeps the fewest possible calls, hence the least accumulated error.

**Two input times.** A model of step Δ maps (X_{L−Δ}, X_L) → X_{L+Δ}, so each call also needs the
state Δ before its input. For L − Δ ≤ 0 it comes from the analysis history (the caller supplies the
analyses at 0 h and −Δ for each step Δ used, e.g. −6 h and −24 h). For L − Δ > 0 it is the anchor
state of lead L − Δ, computed by the same rule (and usually already there: with {6, 24} h and 6-hourly
output every one of them is an output lead; a lone 54 h lead, in contrast, needs 42 h and hence the
6 h chain behind it). Each member of an ensemble runs its own rollout, so the previous and the
current state always come from that member's own model and perturbations.

The rollout is generic: it takes a mapping step_hours → callable(previous, current) → next state,
where a state is any object (e.g. the (upper, surface) tensor pair of
:meth:`~bdlens.models.transformer.EarthSpecificTransformer.step`), so deterministic, Bayesian and
perturbed models all use it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from bdlens.errors import BdlensError

State = TypeVar("State")
StepFn = Callable[[State | None, State], State]


@dataclass(frozen=True)
class Call:
    """One model call: ``step`` hours from the state at lead ``current`` to lead ``lead``.

    ``previous`` is the lead of the second input X_{current − step} (≤ 0: from the analysis
    history), or None for one-input-time models.
    """

    step: int
    lead: int
    current: int
    previous: int | None


def _checked_steps(steps: Iterable[int]) -> list[int]:
    steps = sorted(set(steps), reverse=True)
    if not steps or any(not isinstance(s, int) or s <= 0 for s in steps):
        raise BdlensError(f"model steps must be positive whole hours, got {steps}")
    return steps


def greedy_schedule(lead: int, steps: Iterable[int]) -> list[int]:
    """Steps (hours, largest first) whose sum is ``lead`` hours, taking each largest step as often as it fits."""
    ordered = _checked_steps(steps)
    if not isinstance(lead, int) or lead < 0:
        raise BdlensError(f"lead must be a non-negative whole number of hours, got {lead!r}")
    schedule, rest = [], lead
    for step in ordered:
        schedule += [step] * (rest // step)
        rest %= step
    if rest:
        raise BdlensError(f"lead {lead} h cannot be reached greedily with model steps {sorted(ordered)} h")
    return schedule


def plan_rollout(steps: Iterable[int], leads: Iterable[int], two_times: bool = True) -> list[Call]:
    """The calls, in execution order, that produce every lead in ``leads`` (hours > 0) with anchors.

    Each lead's state is the end of its greedy schedule; states shared by several leads (anchors)
    are computed once. With ``two_times`` each call also needs the state ``step`` hours before its
    input (see the module docstring).
    """
    ordered = _checked_steps(steps)
    calls: list[Call] = []
    done: set[int] = set()

    def need(lead: int) -> None:
        if lead <= 0 or lead in done:
            return
        step = greedy_schedule(lead, ordered)[-1]
        current = lead - step
        need(current)
        previous = current - step if two_times else None
        if previous is not None:
            need(previous)
        calls.append(Call(step, lead, current, previous))
        done.add(lead)

    for lead in sorted(set(leads)):
        if not isinstance(lead, int) or lead <= 0:
            raise BdlensError(f"output leads must be positive whole hours, got {lead!r}")
        need(lead)
    return calls


def rollout(
    models: Mapping[int, StepFn],
    history: Mapping[int, State],
    leads: Collection[int],
    two_times: bool = True,
    with_call: bool = False,
) -> Iterator[tuple[int, State]]:
    """Run the anchored greedy plan; yield (lead hours, state) for every requested lead, ascending.

    ``models`` maps step hours → callable(previous, current) returning the state one step later
    (``previous`` is None when ``two_times`` is false). ``history`` maps hours relative to the
    initial time (0, and −Δ per step for two-time models) → analysis states. States no later call
    needs are dropped as the rollout goes, so memory stays at a few states. With ``with_call`` each
    callable also gets the :class:`Call` it makes, ``fn(previous, current, call)`` (stochastic members
    key their noise to ``call.lead``).
    """
    plan = plan_rollout(models.keys(), leads, two_times)
    needed = {0} | {c.previous for c in plan if c.previous is not None and c.previous <= 0}
    missing = sorted(needed - set(history))
    if missing:
        raise BdlensError(
            f"the rollout needs analysis states at {missing} h relative to the initial time; add them to history"
        )
    last_use: dict[int, int] = {}
    for i, call in enumerate(plan):
        last_use[call.current] = i
        if call.previous is not None:
            last_use[call.previous] = i
    wanted = set(leads)
    states = {lead: history[lead] for lead in needed}
    for i, call in enumerate(plan):
        previous = states[call.previous] if call.previous is not None else None
        extra = (call,) if with_call else ()
        states[call.lead] = models[call.step](previous, states[call.current], *extra)
        if call.lead in wanted:
            yield call.lead, states[call.lead]
        for lead in (call.current, call.previous, call.lead):
            if lead is not None and lead in states and last_use.get(lead, -1) <= i:
                del states[lead]
