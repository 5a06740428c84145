"""The console's end of a chat generation worker (`python -m engine.chat_worker`): one process per side.

The worker talks over its own stdin/stdout (JSON lines), so no port is opened and no other user of the
machine can reach it. A reader thread turns each line into a callback (the screen posts it as a message);
the process's end is reported too, with the end of its stderr, so a pane can say why it died.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine.chat_worker import PARENT_ENV


@dataclass(frozen=True)
class ModelChoice:
    """What answers on one side: a local model folder, or an OpenAI-compatible endpoint."""

    folder: str | None = None
    endpoint: str | None = None
    endpoint_model: str | None = None
    key_env: str = "OPENAI_API_KEY"

    @property
    def label(self) -> str:
        return self.folder or f"{self.endpoint_model}@{self.endpoint}"

    def argv(self) -> list[str]:
        if self.endpoint:
            return ["--endpoint", self.endpoint, "--endpoint-model", self.endpoint_model or "",
                    "--key-env", self.key_env]
        return ["--model", self.folder or ""]


def spec_problem(text: str, run_of: Callable[[int], dict[str, Any] | None] | None = None) -> str | None:
    """Why `text` names no model a chat can open (checked before the chat opens); None if it may. `run_of`:
    the runs.db row of a run id (None where it has none), when the run ids are to be checked too: a reward
    model scores answers and writes none (an evaluation's run id stands for the model it evaluated)."""
    text = text.strip()
    if not text:
        return "an empty model: give a model folder, a run id, or openai:MODEL@BASE_URL"
    if text.isdigit() and run_of is not None:
        run = run_of(int(text))
        if run is None:
            return f"no run {text} in this runs.db"
        if run.get("stage") == "rm":
            return f"run {text} is a reward model: it scores answers, it writes none; chat takes an SFT or PPO run"
        return None
    if text.startswith("openai:"):
        model, _, url = text[len("openai:") :].partition("@")
        if not model or not url.startswith(("http://", "https://")):
            return f"{text!r}: an endpoint is openai:MODEL@BASE_URL, e.g. openai:gpt-4o@https://api.openai.com/v1"
        return None
    if not text.isdigit() and not Path(text).expanduser().is_dir():
        return f"{text!r}: no such folder (a model folder, a run id, or openai:MODEL@BASE_URL)"
    return None


def parse_choice(text: str, key_env: str = "OPENAI_API_KEY") -> ModelChoice:
    """`openai:MODEL@URL` is an endpoint; anything else a model folder (run ids are resolved before)."""
    text = text.strip()
    if text.startswith("openai:"):
        problem = spec_problem(text)
        if problem:
            raise ValueError(problem)
        model, url = text[len("openai:") :].split("@", 1)
        return ModelChoice(endpoint=url, endpoint_model=model, key_env=key_env)
    return ModelChoice(folder=text)


class ChatWorker:
    def __init__(self, choice: ModelChoice, on_event: Callable[[dict[str, Any]], None], cwd: str | None = None,
                 share: int = 1):
        """`share`: how many workers run beside each other; on a CPU they split its cores."""
        self.choice = choice
        self.on_event = on_event
        # Anonymous (unlinked at once): nothing is left in /tmp, whatever becomes of the console.
        self._stderr = tempfile.TemporaryFile(prefix="rlhf-chat-")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env[PARENT_ENV] = str(os.getpid())  # the worker ends with this process, however it ends
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.chat_worker", *choice.argv(),
             "--cpu-threads", str(max(1, (os.cpu_count() or 1) // max(share, 1)))], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, encoding="utf-8", bufsize=1, env=env, cwd=cwd,
            start_new_session=True,  # a Ctrl-C meant for the console is not the worker's
        )
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True, name="chat-worker-reader")
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # stray output from a library: not the protocol
            self.on_event(event)
        code = self.proc.wait()
        self.on_event({"event": "exit", "code": code, "stderr": self.stderr_tail()})

    def stderr_tail(self, size: int = 2000) -> str:
        try:
            with self._lock:
                end = os.fstat(self._stderr.fileno()).st_size
                return os.pread(self._stderr.fileno(), size, max(0, end - size)).decode("utf-8", errors="replace")
        except (OSError, ValueError):
            return ""

    def send(self, request: dict[str, Any]) -> bool:
        """False if the worker is gone (its exit event tells why)."""
        with self._lock:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps(request, ensure_ascii=False) + "\n")
                self.proc.stdin.flush()
                return True
            except (BrokenPipeError, OSError, ValueError):
                return False

    def close(self) -> None:
        """Ask the worker to quit and make sure it goes, without blocking the caller (the UI thread)."""
        self.send({"op": "quit"})
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass

        def reap() -> None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(timeout=5)  # it reads the stderr tail when the process ends
            self._stderr.close()

        threading.Thread(target=reap, daemon=True, name="chat-worker-reaper").start()
