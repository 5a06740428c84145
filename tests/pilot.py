"""Driving the real console with Textual's pilot: an event loop per test, and waiting on states."""

from __future__ import annotations

import asyncio
import functools
import io
import os
import time

from console.app import RlhfConsole
from engine.gpu import GpuUnavailable
from tests.conftest import REPO

CONFIGS = REPO / "configs"


def sync(test):
    """Run an async pilot test on its own event loop (no pytest asyncio plugin needed)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return wrapper


def no_gpu():
    raise GpuUnavailable("no NVIDIA driver: NVML Shared Library Not Found")


def console(**kwargs) -> RlhfConsole:
    kwargs.setdefault("gpu_sampler", no_gpu)
    kwargs.setdefault("configs_dir", CONFIGS)
    return RlhfConsole(os.environ["RLHF_DB"], poll_s=0.1, **kwargs)


# CI runs on a busy machine: a worker thread's first import (pydantic, sqlite-utils) can take many seconds
# there. A wait ends as soon as its state is reached, so a generous floor costs a passing test nothing.
MIN_WAIT_S = 60.0


async def wait_for(pilot, predicate, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + max(timeout, MIN_WAIT_S)
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await pilot.pause(0.1)


def help_text(app) -> str:
    """What the open help screen says, as plain text at the width its dialog has."""
    from rich.console import Console

    static = app.screen.query_one("Static")
    out = Console(width=static.content_region.width or 100, color_system=None, record=True, file=io.StringIO())
    out.print(static.content)
    return "\n".join(line.rstrip() for line in out.export_text().splitlines())


async def open_launch_form(pilot, app):
    """The launch form (n), once the console has polled runs.db and the form has read its recipe."""
    from console.screens.launch import LaunchScreen

    await wait_for(pilot, lambda: app.loaded, 20, "the first poll")
    await pilot.press("n")
    await wait_for(pilot, lambda: isinstance(app.screen, LaunchScreen) and app.screen.loaded, 20, "the form")
    return app.screen
