"""Process groups on this machine: is a run's group still there, and ending it. No heavy imports: the
console calls these on every poll."""

from __future__ import annotations

import os
import signal


def group_alive(pgid: int | None) -> bool:
    """Whether any process of the group is still there (on this machine)."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, not ours to signal
    return True


def kill_group(pgid: int) -> bool:
    """SIGKILL a run's group after its grace period; False if it had already gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True
