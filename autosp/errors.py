"""Errors that autosp raises on configurations it cannot run exactly."""

from __future__ import annotations


class AutoSPError(RuntimeError):
    """A model or configuration that autosp cannot make sequence-parallel; the message says
    the cause and what to change."""


class InputMismatchError(AutoSPError, ValueError):
    """Ranks of one sequence-parallel group were given different batches."""


class CollectiveError(AutoSPError):
    """A collective over the sequence-parallel group failed: another rank exited, stopped
    responding, or ran a different collective."""
