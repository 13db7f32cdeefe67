"""Simulating a killed training job: stop a trainer right after it saved its state at a given step."""

from __future__ import annotations

from types import ModuleType

import pytest


def stop_after_saving(monkeypatch: pytest.MonkeyPatch, trainer: ModuleType, step: int) -> None:
    """Make ``trainer.save_state`` raise KeyboardInterrupt once the state of ``step`` is on disk
    (undo with ``monkeypatch.undo()``)."""
    original = trainer.save_state

    def save_then_stop(run_dir, state, *args):
        original(run_dir, state, *args)
        if state["step"] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_state", save_then_stop)
