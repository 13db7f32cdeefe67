"""Hierarchical temporal aggregation: greedy schedules, anchored plans and the generic rollout."""

from __future__ import annotations

import pytest
import torch

from bdlens.errors import BdlensError
from bdlens.models import Call, EarthSpecificTransformer, ModelConfig, greedy_schedule, plan_rollout, rollout

PANGU_STEPS = {1, 3, 6, 24}


@pytest.mark.parametrize(
    "lead,schedule",
    [(56, [24, 24, 6, 1, 1]), (71, [24, 24, 6, 6, 6, 3, 1, 1]), (72, [24, 24, 24]), (5, [3, 1, 1])],
)
def test_greedy_schedule_pangu(lead, schedule):
    assert greedy_schedule(lead, PANGU_STEPS) == schedule
    assert len(greedy_schedule(lead, PANGU_STEPS)) == len(schedule)


def test_greedy_schedule_rejects_unreachable_leads():
    with pytest.raises(BdlensError, match="cannot be reached"):
        greedy_schedule(9, {6, 24})
    with pytest.raises(BdlensError, match="positive whole hours"):
        greedy_schedule(6, {0, 6})


def test_plan_with_6_and_24_hour_models_one_input_time():
    plan = plan_rollout({6, 24}, range(6, 61, 6), two_times=False)
    assert [(c.step, c.current, c.lead) for c in plan] == [
        (6, 0, 6), (6, 6, 12), (6, 12, 18), (24, 0, 24), (6, 24, 30), (6, 30, 36), (6, 36, 42),
        (24, 24, 48), (6, 48, 54), (6, 54, 60),
    ]
    assert all(c.previous is None for c in plan)
    # Every 6 h to 10 days: one call per output lead, each with the fewest possible calls behind it.
    assert len(plan_rollout({6, 24}, range(6, 241, 6), two_times=False)) == 40


def test_plan_with_two_input_times_takes_the_previous_state_from_history_or_anchors():
    plan = plan_rollout({6, 24}, [6, 12, 24, 30, 48])
    assert plan == [
        Call(6, 6, 0, -6), Call(6, 12, 6, 0), Call(24, 24, 0, -24),
        Call(6, 18, 12, 6),  # 30 h = anchor 24 h + 6 h needs the state at 18 h
        Call(6, 30, 24, 18), Call(24, 48, 24, 0),
    ]
    assert len(plan_rollout({6, 24}, range(6, 241, 6))) == 40


def test_rollout_passes_the_right_states_and_yields_leads_in_order():
    calls = []

    def model(step):
        def run(previous, current):
            # States are (lead, number of calls behind it); the inputs must be `step` hours apart.
            assert current[0] - previous[0] == step
            calls.append(step)
            return current[0] + step, current[1] + 1
        return run

    history = {0: (0, 0), -6: (-6, 0), -24: (-24, 0)}
    out = list(rollout({6: model(6), 24: model(24)}, history, [6, 12, 18, 24, 30, 48, 54]))
    assert [lead for lead, _ in out] == [6, 12, 18, 24, 30, 48, 54]
    assert all(state[0] == lead for lead, state in out)
    assert {lead: state[1] for lead, state in out} == {6: 1, 12: 2, 18: 3, 24: 1, 30: 2, 48: 2, 54: 3}
    assert len(calls) == 7 + 2  # 54 h = 48 h + 6 h also needs 42 h: two more calls, 36 h and 42 h


def test_rollout_needs_the_history_it_uses():
    with pytest.raises(BdlensError, match=r"\[-24\]"):
        list(rollout({6: lambda p, c: c, 24: lambda p, c: c}, {0: 0, -6: 0}, [24]))
    out = dict(rollout({24: lambda p, c: c + 24}, {0: 0}, [24, 48], two_times=False))
    assert out == {24: 24, 48: 48}


def test_rollout_with_the_transformer_step():
    config = ModelConfig.from_dict(dict(
        upper_variables=["geopotential"], levels=[500, 850], surface_variables=["2m_temperature"],
        nlat=4, nlon=16, embed_dim=4, depths=[1, 1, 1, 1], heads=[1, 1, 1, 1], window=[2, 2, 2],
        patch=[2, 2, 2], residual=True,
    ))
    torch.manual_seed(0)
    models = {6: EarthSpecificTransformer(config).eval(), 24: EarthSpecificTransformer(config).eval()}
    history = {h: (torch.randn(1, 1, 2, 4, 16), torch.randn(1, 1, 4, 16)) for h in (0, -6, -24)}
    with torch.no_grad():
        out = dict(rollout({s: m.step for s, m in models.items()}, history, [6, 24, 30]))
        state_6 = models[6].step(history[-6], history[0])
        state_12 = models[6].step(history[0], state_6)
        state_18 = models[6].step(state_6, state_12)
        expected_30 = models[6].step(state_18, models[24].step(history[-24], history[0]))
    torch.testing.assert_close(out[30][0], expected_30[0])
    torch.testing.assert_close(out[6][1], state_6[1])
