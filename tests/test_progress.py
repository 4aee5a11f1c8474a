"""Tests for jaxattn.progress: bars only on a terminal (no escape codes in redirected logs)."""

from __future__ import annotations

import io
import sys

import pytest

from jaxattn import progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("JAXATTN_NO_PROGRESS", raising=False)  # tests/conftest.py sets it
    monkeypatch.delenv("JAXATTN_PROGRESS", raising=False)
    return monkeypatch


def _drawn(env: pytest.MonkeyPatch, tty: bool) -> str:
    stream = _Stream(tty)
    env.setattr(sys, "stderr", stream)
    assert list(progress.progress_iter(range(3), desc="work")) == [0, 1, 2]
    return stream.getvalue()


def test_no_bar_when_stderr_is_not_a_terminal(env: pytest.MonkeyPatch) -> None:
    assert _drawn(env, tty=False) == ""
    env.setattr(sys, "stderr", _Stream(False))
    assert not progress.progress_enabled(True)


def test_bar_on_a_terminal_and_forced(env: pytest.MonkeyPatch) -> None:
    assert "work" in _drawn(env, tty=True)
    env.setenv("JAXATTN_PROGRESS", "1")
    assert "work" in _drawn(env, tty=False)  # forced onto a log file
    env.setenv("JAXATTN_PROGRESS", "0")
    assert _drawn(env, tty=True) == ""


def test_requested_false_and_no_progress_win(env: pytest.MonkeyPatch) -> None:
    env.setattr(sys, "stderr", _Stream(True))
    env.setenv("JAXATTN_PROGRESS", "1")
    assert not progress.progress_enabled(False)
    env.setenv("JAXATTN_NO_PROGRESS", "1")
    assert not progress.progress_enabled(True)


def test_timer_announces_only_long_stages(env: pytest.MonkeyPatch) -> None:
    import time

    stream = _Stream(False)
    env.setattr(sys, "stderr", stream)
    timer = progress.Timer(announce_after=0.05)
    with timer.stage("quick"):
        pass
    with timer.stage("slow"):
        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "jaxattn: slow ..." and lines[1].startswith("jaxattn: slow done in ")
    assert len(lines) == 2 and "quick" not in stream.getvalue()
    assert set(timer.seconds) == {"quick", "slow"} and timer.seconds["slow"] >= 0.3
    assert progress.Timer().announce_after is None  # library timers stay silent


def test_stage_lines_follow_the_progress_switches(env: pytest.MonkeyPatch) -> None:
    assert progress.stage_lines_enabled(True)  # plain text: shown on a redirected stderr too
    assert not progress.stage_lines_enabled(False)
    env.setenv("JAXATTN_PROGRESS", "0")
    assert not progress.stage_lines_enabled(True)
