"""Helpers shared by the test modules (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
from typer.testing import CliRunner

from resnet_edge.cli import app

runner = CliRunner()


def error_line(args) -> str:
    """Run the CLI and require what the README promises for a mistake: exit 1, one line `error: ...`."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args) -> tuple[subprocess.Popen, str]:
    """`resnet-edge serve ARGS` on a free port in a subprocess; returns it and its URL once ready."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "resnet_edge", "serve", "--port", str(port), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not become ready")


# Waiting for a state, never for a time: each polls until its condition holds and fails with what it was
# waiting for after a deadline far beyond what the wait needs on a slow, loaded machine.
DEADLINE_S = 30.0


def wait_until(condition: Callable[[], object], waiting_for: str, deadline_s: float = DEADLINE_S) -> None:
    """Poll ``condition`` (in this thread) until it is true; AssertionError naming ``waiting_for`` past the deadline."""
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, f"still waiting after {deadline_s:g} s for {waiting_for}"
        time.sleep(0.005)


async def until(condition: Callable[[], object], waiting_for: str, deadline_s: float = DEADLINE_S) -> None:
    """``wait_until`` on an event loop: the loop runs (and the code under test with it) between polls."""
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, f"still waiting after {deadline_s:g} s for {waiting_for}"
        await asyncio.sleep(0.001)
