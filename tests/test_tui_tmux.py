"""Smoke test: `xdiff browse` in a real terminal (tmux), reading the screen it draws."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tui_fixtures import make_analysed_run

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
SOCKET = f"xdiff-test-{os.getpid()}"  # a private tmux server: never touches the user's sessions


def tmux(*args: str, **kwargs) -> subprocess.CompletedProcess:  # noqa: ANN003
    return subprocess.run(["tmux", "-L", SOCKET, *args], **kwargs)


def _capture(session: str) -> str:
    return tmux("capture-pane", "-p", "-t", session, capture_output=True, text=True).stdout


def _wait_for(session: str, needle: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    screen = ""
    while time.monotonic() < deadline:
        screen = _capture(session)
        if needle in screen:
            return screen
        time.sleep(0.3)
    raise AssertionError(f"{needle!r} never appeared on screen:\n{screen}")


def test_browse_draws_the_run_and_quits_on_q(xdiff_home: Path):
    make_analysed_run()
    xdiff = Path(sys.executable).with_name("xdiff")
    command = f"{xdiff} browse" if xdiff.exists() else f"{sys.executable} -m xdiff_cli browse"
    session = f"xdiff-smoke-{os.getpid()}"
    env = {**os.environ, "XDIFF_HOME": str(xdiff_home), "TERM": "xterm-256color"}
    tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", f"{command}; sleep 5", check=True, env=env)
    try:
        screen = _wait_for(session, "· by rank")  # the list is filled, not only the tabs drawn
        assert "demo-run" in screen
        assert "6 features (6 live) · by rank" in screen
        assert "feature 3" in screen  # the top-ranked A-exclusive feature, selected
        tmux("send-keys", "-t", session, "q", check=True)
        deadline = time.monotonic() + 10
        while "A-exclusive" in _capture(session) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "A-exclusive" not in _capture(session), "the app did not quit on q"
    finally:
        tmux("kill-server", capture_output=True)
