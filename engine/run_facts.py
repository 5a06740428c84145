"""What a run's row says, in the words the console and `rlhf runs` print: how long it ran (its stretches,
a stop and a resume making two; the short `1h05m` form) and what its recorded error says happened. No heavy
imports: the console's table asks on every redraw."""

from __future__ import annotations

import functools
import json
import math
import re
import socket
import statistics
import time
from typing import Any, Iterable


def run_segments(run: dict[str, Any]) -> tuple[tuple[float, float | None], ...]:
    """The stretches the run ran, (start, end) each (end None: the one going on, or one a kill cut short)."""
    return _segments(run.get("segments") or "[]")


@functools.lru_cache(maxsize=4096)
def _segments(text: str) -> tuple[tuple[float, float | None], ...]:
    # Parsed once per distinct text: every redraw of the table asks for each row's time and ETA.
    try:
        segments = json.loads(text)
    except ValueError:
        return ()
    return tuple((s[0], s[1]) for s in segments if isinstance(s, list) and len(s) == 2 and s[0])


def elapsed(run: dict[str, Any]) -> float:
    """Seconds the run has spent running (to its end, once ended): the time it sat stopped between a stop
    and its resume does not count."""
    active = run["status"] in ("pending", "running")
    end = run["ended"] if run.get("ended") and not active else time.time()
    segments = run_segments(run)
    if not segments:  # a row from before segments were recorded
        return max(0.0, end - run["started"])
    total = 0.0
    for k, (start, stop) in enumerate(segments):
        last = k == len(segments) - 1
        total += max(0.0, (stop if stop else end if last else start) - start)
    return total


def current_start(run: dict[str, Any]) -> float | None:
    """When the run's current stretch began (its last resume), for a rate that leaves the pause out."""
    segments = run_segments(run)
    return segments[-1][0] if segments else None


STALL_MIN_S = 300.0  # a pause shorter than this is a save, an evaluation pass, a slow first step
STALL_PACE = 10  # ... and so is one shorter than this many of the run's own recent intervals
STALL_WINDOW = 64  # the recent logged moments its pace is judged on


def silent_for(walls: list[float], now: float) -> float | None:
    """How long a running run has logged nothing, where that is far past its own pace (ten of its recent
    intervals between logged moments, and five minutes at least); else None. `walls`: the distinct times
    it logged at in its current stretch, oldest first (a resumed run's earlier points say nothing of its
    pace now; a stretch with nothing logged yet is still starting). A hung rank, a process stopped with
    SIGSTOP, a runs.db that takes no writes: each keeps the status "running" and the clock ticking while
    nothing arrives."""
    if not walls:
        return None
    recent = walls[-STALL_WINDOW:]
    quiet = now - recent[-1]
    pace = statistics.median(b - a for a, b in zip(recent, recent[1:])) if len(recent) > 1 else 0.0
    return quiet if quiet > max(STALL_MIN_S, STALL_PACE * pace) else None


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def error_summary(error: str | None) -> str:
    """What a recorded error says happened: its last non-blank line (a traceback's exception; the line a
    supervisor adds about a kill)."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    # An exception's module path takes the room the reason needs (a status line is cut at 80 columns):
    # "engine.data.records.DataError: x" reads as "DataError: x".
    return _MODULE_PATH.sub("", lines[-1]) if lines else ""


_MODULE_PATH = re.compile(r"^(?:[a-z_][\w]*\.)+(?=[A-Z]\w*: )")


def pipeline_waits_for(pipeline: dict[str, Any], runs: list[dict[str, Any]], db: str | None = None) -> str:
    """What an ended pipeline whose stage still runs (its own process was killed alone) waits for before
    a resume can continue it: its recorded error says to resume, which is refused until that stage ends.
    `db`: the runs.db the hint's command names (None: the default one)."""
    if pipeline["status"] in ("pending", "running"):
        return ""
    live = [run for run in runs if run.get("pipeline_id") == pipeline["id"] and run["status"] in ("pending", "running")]
    if not live:
        return ""
    where = f" --db {db}" if db else ""
    return (f"its {live[-1]['stage']} stage, run {live[-1]['id']}, still runs on its own: resume the pipeline once "
            f"that run ends (or stop that run: rlhf stop {live[-1]['id']}{where})")


def stop_outcome(run: dict[str, Any]) -> str:
    """What a stop asked of this run will leave, for the one who asked."""
    if run.get("stage") == "eval":
        return "it ends after the batch in hand (a resume goes on from there)"
    if (run.get("step") or 0) > 0:
        return "it saves a checkpoint and ends"
    if run.get("status") == "running":  # no step recorded yet: the first may be under way
        return "in its first step, it saves a checkpoint after it and ends; still setting up, it just ends"
    return "it has not trained a step yet: it just ends (nothing to save)"


# The one field a stage has that the recipe has too (engine.config.Recipe: `model.path` is the recipe's, not
# a stage's): a stage's own keeps its stage's name when shown short.
SHARED_FIELDS = ("model",)

# The --set keys a pipeline gives a stage to feed it the exports of the stages before it (engine.pipeline's
# wiring): the same for every run of a pipeline, so not what tells its runs apart.
PIPELINE_WIRING = ("rm.model.path", "ppo.model", "ppo.reward_model", "ppo.reward_fn")


def user_overrides(run: dict[str, Any], pipeline: dict[str, Any] | None = None) -> list[str]:
    """The --set items a user gave the run: its own, and for a pipeline's stage its pipeline's (baked into the
    recipe the stage reads, so not among the stage's), without the pipeline's wiring."""
    def items(row: dict[str, Any] | None) -> list[str]:
        try:
            return [str(item) for item in json.loads((row or {}).get("overrides") or "[]")]
        except ValueError:
            return []

    own = items(run)
    if run.get("pipeline_id") is None:
        return own
    return items(pipeline) + [item for item in own if item.split("=", 1)[0] not in PIPELINE_WIRING]


def run_changes(run: dict[str, Any]) -> list[dict[str, Any]]:
    """What each resume with --allow-change changed, oldest first (runs.changes), [] for none."""
    try:
        changes = json.loads(run.get("changes") or "[]")
    except ValueError:
        return []
    return [c for c in changes if isinstance(c, dict)] if isinstance(changes, list) else []


def changes_text(run: dict[str, Any]) -> str:
    """` · changed at step 14: ppo.target_kl (None -> 2.0)` for a run resumed with a change: its recorded
    config and overrides are its latest, and read as if from its first step."""
    parts = [(f"at step {c['step']}" if c.get("step") is not None else "at its next resume") + ": "
             + ", ".join(c.get("fields") or []) for c in run_changes(run)]
    return f" · changed {'; '.join(parts)}" if parts else ""


def runs_using(run: dict[str, Any], runs: Iterable[dict[str, Any]]) -> list[int]:
    """The other runs whose recorded settings name a path in `run`'s folder: trained from its export, scored
    by it as a reward model, evaluating or judging with it. Its files deleted, their resumes and score rows
    lose a model."""
    folder = str(run.get("output_dir") or "").rstrip("/")
    if not folder:
        return []
    marks = (folder + "/", folder + '"')  # in a recorded JSON config: a path under the folder, or the folder
    return sorted(other["id"] for other in runs
                  if other["id"] != run["id"] and any(mark in (other.get("config") or "") for mark in marks))


HOST = socket.gethostname()  # once: shown_status runs for every row at every redraw of the run table


def shown_status(run: dict[str, Any]) -> str:
    """The stored status, or what can be told beyond it: a stop under way, or a run whose processes are gone
    without anyone recording how it ended (its machine rebooted, say)."""
    from engine.procs import run_processes_gone

    if run["status"] in ("pending", "running"):
        if run.get("host") == HOST and run_processes_gone(run):
            return "lost"
        if run.get("stop_requested"):
            return "stopping"
    return run["status"]
