"""End to end in a real terminal: the console in tmux (a private socket), a tiny SFT run launched from
its form, the terminal killed mid-run as an SSH drop would, and a new console that finds the run finished
with its whole history."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from engine.store import Store
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")


class Tmux:
    def __init__(self, cwd, env):
        self.socket = f"rlhf-test-{uuid.uuid4().hex[:8]}"
        self.cwd, self.env = cwd, env

    def _run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                              env=self.env).stdout

    def start(self, command: str, width: int = 100, height: int = 30) -> None:
        subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", "new-session", "-d", "-x", str(width),
                        "-y", str(height), "-c", str(self.cwd), command], check=True, env=self.env)

    def keys(self, *keys: str) -> None:
        self._run("send-keys", "-t", "0", *keys)

    def screen(self) -> str:
        return self._run("capture-pane", "-p", "-t", "0")

    def wait_for(self, predicate, timeout: float, what: str) -> str:
        deadline = time.monotonic() + max(timeout, 60)  # a busy CI machine: the state decides, not the clock
        while time.monotonic() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}; the screen:\n{self.screen()}")

    def kill_server(self) -> None:
        self._run("kill-server")


def _row(text: str, run_id: int) -> str:
    return next((line for line in text.splitlines() if line.strip().startswith(f"{run_id} ")), "")


def test_launch_in_tmux_survive_the_terminal_and_reattach(workdir):
    env = {**os.environ, "TERM": "xterm-256color"}
    console = f"{sys.executable} -m engine.cli console --db {workdir / 'runs.db'}"
    # The tiny recipe, long enough (42 steps) that the terminal surely dies while the run trains: it dies
    # as soon as the console shows the run running (the trainer says so before its first step).
    (workdir / "configs").mkdir()
    (workdir / "configs" / "accelerate").symlink_to(REPO / "configs" / "accelerate")
    tiny = (REPO / "configs" / "tiny.yaml").read_text()
    assert "    epochs: 4\n" in tiny
    (workdir / "configs" / "tiny.yaml").write_text(tiny.replace("    epochs: 4\n", "    epochs: 6\n", 1))
    first = Tmux(workdir, env)
    try:
        first.start(console)
        first.wait_for(lambda s: "no runs yet" in s, 30, "the empty run table")
        first.keys("n")
        first.wait_for(lambda s: "demo/model" in s, 30, "the form filled from configs/tiny.yaml")
        first.keys("C-s")
        first.wait_for(lambda s: "running" in _row(s, 1), 600, "run 1 running")
    finally:
        first.kill_server()  # the terminal goes away mid-run, as an SSH drop would take it

    with Store(workdir / "runs.db") as store:
        assert store.run(1)["status"] in ("pending", "running")  # the run outlived its console

    second = Tmux(workdir, env)
    try:
        second.start(console)
        screen = second.wait_for(lambda s: "done" in _row(s, 1), 600, "run 1 done in a new console")
        assert "42/42" in _row(screen, 1)
        deadline = time.monotonic() + 60
        with Store(workdir / "runs.db") as store:
            while store.run(1)["exit_code"] is None and time.monotonic() < deadline:
                time.sleep(0.2)  # "done" comes from the trainer; the exit code from its supervisor, last
            run = store.run(1)
            rows = store.metrics_since(0, run_id=1)
        assert run["exit_code"] == 0
        assert [r["run_seq"] for r in rows] == list(range(1, len(rows) + 1))
        loss_steps = [r["step"] for r in rows if r["name"] == "loss"]
        # logging_steps 2 over 42 steps (and step 1, which transformers always logs): the whole history
        assert loss_steps == sorted(set(loss_steps)) and set(range(2, 43, 2)) <= set(loss_steps)
        assert any("\u2800" < ch <= "\u28ff" for ch in screen)  # drawn from that history
    finally:
        second.kill_server()


def _wait_run(db, run_id: int, predicate, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Store(db) as store:
            run = store.run(run_id)
        if predicate(run):
            return run
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}: {run}")


def test_a_console_started_elsewhere_with_db_stops_and_resumes_a_run(workdir, tmp_path):
    """The console in another directory, given --db: it stops a run launched from the project directory
    and resumes it (the recorded recipe and accelerate config, not paths relative to the console's cwd).
    `rlhf --db X` is `rlhf console --db X`, as `rlhf` alone is the console."""
    env = {**os.environ, "TERM": "xterm-256color"}
    db = workdir / "runs.db"
    # launched as a user does, from the project directory with relative paths
    (workdir / "configs").mkdir()
    (workdir / "configs" / "accelerate").symlink_to(REPO / "configs" / "accelerate")
    shutil.copy(REPO / "configs" / "tiny.yaml", workdir / "configs" / "tiny.yaml")
    launched = subprocess.run(
        [sys.executable, "-m", "engine.cli", "launch", "sft", "configs/tiny.yaml", "--detach",
         "--accelerate-config", "configs/accelerate/cpu.yaml",
         "--set", "sft.train.max_steps=3000", "--set", "sft.train.save_steps=100000"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    console = Tmux(elsewhere, env)
    try:
        console.start(f"{sys.executable} -m engine.cli --db={db}")
        console.wait_for(lambda s: "running" in _row(s, 1), 600, "run 1 running")
        # The form checks the project's recipe as from the project folder (its paths are relative to it).
        console.keys("n")
        console.wait_for(lambda s: "Validate" in s or "validate" in s, 60, "the launch form")
        console.keys("C-t")
        console.wait_for(lambda s: "the recipe is valid" in s, 120, "the recipe checked from the project folder")
        console.keys("Escape")
        console.wait_for(lambda s: "running" in _row(s, 1) or "stopped" in _row(s, 1), 60, "the run table again")
        _wait_run(db, 1, lambda r: (r["step"] or 0) >= 2, 180, "a few steps")
        console.keys("x")
        console.wait_for(lambda s: "Stop run 1" in s, 30, "the stop dialog")
        console.keys("y")
        stopped = _wait_run(db, 1, lambda r: r["status"] == "stopped" and r["exit_code"] is not None, 240,
                            "the stop")
        console.wait_for(lambda s: "stopped" in _row(s, 1), 60, "run 1 shown stopped")
        console.keys("r")
        console.wait_for(lambda s: "Resume run 1" in s, 30, "the resume dialog")
        console.keys("y")
        _wait_run(db, 1, lambda r: r["status"] in ("pending", "running") and r["pid"] != stopped["pid"], 180,
                  "the resume, from the other directory")
        resumed = _wait_run(db, 1, lambda r: r["status"] == "running" and (r["step"] or 0) > stopped["step"], 240,
                            "training past the stop")
        assert resumed["error"] is None
        console.keys("x")
        console.wait_for(lambda s: "Stop run 1" in s, 30, "the stop dialog")
        console.keys("y")
        _wait_run(db, 1, lambda r: r["status"] == "stopped" and r["exit_code"] is not None, 240, "the last stop")
    finally:
        console.kill_server()
        with Store(db) as store:  # never leave a detached run training after the test
            run = store.run(1)
        if run["status"] in ("pending", "running") and run.get("pgid"):
            try:
                os.killpg(run["pgid"], 9)
            except ProcessLookupError:
                pass


def test_the_shell_and_edit_keys_hand_the_terminal_over_in_the_runs_folder_and_back(tmp_path):
    """`!` suspends the console and runs $SHELL in the highlighted run's folder; when it exits the console
    is back, as it was. `E` opens $EDITOR on the recipe as runs.db recorded it, read-only (it opened the file
    the run was launched from, which may have changed since, or the run's folder where it had no such file)."""
    db = tmp_path / "runs.db"
    launched_from = tmp_path / "mytiny.yaml"
    launched_from.write_text("name: tiny\nsft:\n  train:\n    lr: 9.9e-3\n")  # edited after the launch
    recorded = {"name": "tiny", "sft": {"train": {"lr": 0.003, "epochs": 1.0}}}
    with Store(db) as store:
        run_id = store.create_run(stage="sft", name="tiny", recipe=str(launched_from), config=json.dumps(recorded),
                                  output_root=str(tmp_path / "runs"))
        store.update_run(run_id, status="done")
        folder = store.run(run_id)["output_dir"]
    shell = tmp_path / "fake-shell"
    shell.write_text(f"#!/bin/sh\npwd > {tmp_path / 'where'}\necho shell-was-here\nsleep 1\n")
    editor = tmp_path / "fake-editor"
    editor.write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path / 'edited'}\necho \"$1\" > {tmp_path / 'viewed'}\n"
                      "[ \"$(stat -c %a \"$1\")\" = 400 ] && echo read-only-view\necho editor-was-here\nsleep 1\n")
    for script in (shell, editor):
        script.chmod(0o755)
    env = {**os.environ, "TERM": "xterm-256color", "PYTHONPATH": str(REPO)}  # this checkout's console
    console = Tmux(tmp_path, env)
    try:  # SHELL for the console only: tmux itself runs the command through $SHELL
        console.start(f"env SHELL={shell} EDITOR={editor} {sys.executable} -m engine.cli console --db {db}")
        console.wait_for(lambda s: "done" in _row(s, run_id), 60, "the run")
        console.keys("!")
        console.wait_for(lambda s: "shell-was-here" in s, 60, "the shell's output on the terminal")
        console.wait_for(lambda s: "done" in _row(s, run_id), 60, "the console back after the shell exits")
        assert (tmp_path / "where").read_text().strip() == str(Path(folder).resolve())
        console.keys("E")
        console.wait_for(lambda s: "editor-was-here" in s and "read-only-view" in s, 60,
                         "the editor's output on the terminal")
        console.wait_for(lambda s: "done" in _row(s, run_id), 60, "the console back after the editor exits")
        assert json.loads((tmp_path / "edited").read_text()) == recorded
        view = Path((tmp_path / "viewed").read_text().strip())
        deadline = time.monotonic() + 60
        while view.exists() and time.monotonic() < deadline:  # removed once the editor has returned
            time.sleep(0.1)
        assert not view.exists()
    finally:
        console.kill_server()
