"""The Textual app: `rlhf console [--db runs.db]`.

The App owns every worker (a screen's workers die with it): one follows runs.db (`seq > cursor`), one
tails the selected run's log by byte offset, one samples the GPUs. Workers post messages; the App's
handlers update its state (`history`, `runs`) and call down into the screens. It never owns a training
process: runs start through engine.launch's detached supervisor and outlive the console.

Heavy imports (sqlite-utils pulls pandas; engine.launch pulls pydantic) happen inside the workers, after
the first frame.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.worker import get_current_worker

from console.messages import (
    ActionDone,
    ChatSaved,
    ChatSettingsChosen,
    GpuRead,
    HistoryLoading,
    HistoryReset,
    LogRead,
    MetricsPolled,
    RunsPolled,
    SamplesLoaded,
    StoreFailed,
)
from console.worker_failures import SaysWorkerFailures

if TYPE_CHECKING:  # both import numpy or the runs screen's widgets, which start-up defers
    from console.screens.runs import RunsScreen
    from console.series import History

POLL_S = 1.0  # runs.db; a chart redraws at most once a second anyway
LOG_POLL_S = 0.25
GPU_POLL_S = 1.0
ACTIVE = ("pending", "running")


# What a finished action did, where "done" would say too much: a resumed or launched run has only started.
DONE_SAYS = {"launch": "started", "resume": "resuming", "stop": "asked to stop",
             "kill": "killed after the grace period", "delete": "deleted"}


class RlhfConsole(SaysWorkerFailures, App):
    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses elsewhere find it too
    TITLE = "rlhf-console"
    BINDINGS = [
        Binding("q", "quit", "Quit", show=False),  # in help; the footer's 80 columns go to the rest
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("f1", "help", "Help", show=False),
        Binding("g", "gpus", "GPUs"),
        Binding("n", "launch", "New run"),
    ]

    def __init__(
        self,
        db_path: str | os.PathLike = "runs.db",
        configs_dir: str | os.PathLike | None = None,
        stop_grace_s: float | None = None,
        gpu_sampler: Callable[[], Any] | None = None,
        poll_s: float = POLL_S,
        chat: tuple[str, str | None, str] | None = None,
    ):
        super().__init__()
        self.initial_chat = chat  # `rlhf chat A [B] [--key-env VAR]`: the chat screen opens over the runs
        self.chat_settings: Any = None  # the last ones set in a chat (a ChatSettings), for the next chat
        self.db_path = Path(db_path).resolve()
        self.db_is_new = not self.db_path.exists()  # made by this console: a mistyped --db shows as such
        self.configs_dir = Path(configs_dir) if configs_dir is not None else default_configs_dir(self.db_path)
        self.stop_grace_s = stop_grace_s
        self._styled_filters: dict[int, Any] = {}
        self.gpu_sampler = gpu_sampler
        self.poll_s = poll_s
        self._history = None
        self.runs: dict[int, dict[str, Any]] = {}
        self.pipelines: dict[int, dict[str, Any]] = {}  # `rlhf pipeline`s, by id
        self.loaded = False  # the first poll has arrived
        self.log_target: tuple[int, Path] | None = None  # read by the log worker thread
        self.gpu_readings: list[Any] | None = None
        self.gpu_unavailable: str | None = None
        self.gpu_history: dict[int, dict[str, list[float]]] = {}
        self.gpu_pgids: dict[int, int | None] = {}
        self._wake = threading.Event()  # set to make the store worker poll now (after an action)
        self._follower = None  # console.follower.StoreFollower, once the store worker has made it
        self._samples_request = 0

    @property
    def history(self) -> History:
        """Every followed run's metrics (console.series.History), made on first use: numpy loads after the
        first frame."""
        if self._history is None:
            from console.series import History

            self._history = History()
        return self._history

    # -- start-up -------------------------------------------------------------------------------------
    def get_line_filters(self) -> list[Any]:
        from console.filters import StyledSegments

        filters = super().get_line_filters()
        for line_filter in filters:
            if id(line_filter) not in self._styled_filters:
                self._styled_filters[id(line_filter)] = StyledSegments(line_filter)
        return [self._styled_filters[id(line_filter)] for line_filter in filters]

    def on_mount(self) -> None:
        from console.screens.runs import RunsScreen

        self.push_screen(RunsScreen())
        if self.initial_chat is not None:
            self.open_chat(*self.initial_chat, standalone=True)
        # After the first frame: the workers' imports (sqlite-utils, NVML) would compete with it for the GIL.
        self.call_after_refresh(self._start_workers)

    def _start_workers(self) -> None:
        self.follow_store()
        self.follow_log()
        self.sample_gpus()

    @property
    def home(self) -> RunsScreen | None:
        from console.screens.runs import RunsScreen

        for screen in self.screen_stack:
            # While the app shuts down the screen is still on the stack with its widgets gone: a poll that
            # lands then has nothing to update. (`_exit` is set by a quit; a shutdown without one, as the
            # test pilot's, stops the app running first.)
            if (isinstance(screen, RunsScreen) and screen.is_attached and self.is_running
                    and not (self._exit or self._closed)):
                return screen
        return None

    # -- workers (threads) ----------------------------------------------------------------------------
    @work(thread=True, group="store", exit_on_error=False)
    def follow_store(self) -> None:
        from console.follower import StoreFollower
        from engine.store import StoreError

        worker = get_current_worker()
        try:
            follower = StoreFollower(self.db_path)
        except (StoreError, OSError) as err:
            self.post_message(StoreFailed(str(err)))
            return
        self._follower = follower
        self.call_from_thread(lambda: self.follow(self.history.followed))  # looked at before the follower was
        failing = False
        try:
            while not worker.is_cancelled:
                try:
                    messages, more = follower.poll()
                except sqlite3.Error as err:  # a locked or damaged file: say so once, keep trying
                    if not failing:
                        self.post_message(StoreFailed(f"{self.db_path}: {err}"))
                    failing, more, messages = True, False, []
                else:
                    failing = False
                for message in messages:
                    self.post_message(message)
                if not more:
                    self._wake.wait(self.poll_s)
                    self._wake.clear()
        finally:
            follower.close()

    @work(thread=True, group="log", exit_on_error=False)
    def follow_log(self) -> None:
        from console.logtail import LogTail

        worker = get_current_worker()
        current, tail, last_pending = None, None, None
        while not worker.is_cancelled:
            target = self.log_target
            if target != current:
                current, tail, last_pending = target, (LogTail(target[1]) if target else None), None
                reset = True
            else:
                reset = False
            if tail is not None and current is not None:
                lines, pending = tail.read()
                if reset or lines or pending != last_pending:
                    last_pending = pending
                    self.post_message(LogRead(current[0], lines, pending, reset, tail.truncated_start))
            time.sleep(LOG_POLL_S)

    @work(thread=True, group="gpu", exit_on_error=False)
    def sample_gpus(self) -> None:
        from engine.gpu import GpuSampler, GpuUnavailable, process_group

        worker = get_current_worker()
        try:
            sampler = (self.gpu_sampler or GpuSampler)()
        except GpuUnavailable as err:
            self.post_message(GpuRead(None, {}, unavailable=str(err)))
            return
        try:
            while not worker.is_cancelled:
                try:
                    readings = sampler.read()
                except Exception as err:  # NVMLError (a GPU fell off the bus, the driver reloaded…)
                    self.post_message(GpuRead(None, {}, unavailable=f"reading the GPUs failed: {err}"))
                    return
                pgids = {pid: process_group(pid) for r in readings for pid in r.pids}
                self.post_message(GpuRead(readings, pgids))
                time.sleep(GPU_POLL_S)
        finally:
            sampler.close()

    @work(thread=True, group="samples", exit_on_error=False)
    def load_samples(self, run_id: int, step: int | None) -> None:
        from engine.store import Store

        self._samples_request += 1
        request = self._samples_request
        with Store(self.db_path) as store:
            steps = store.sample_steps(run_id)
            if step is None or step not in steps:
                step = steps[-1] if steps else None
            rows = store.samples(run_id, step) if step is not None else []
        if request == self._samples_request:  # a newer request supersedes this one
            self.post_message(SamplesLoaded(run_id, steps, step, rows))

    # -- handlers: state first, then the widgets --------------------------------------------------------
    def on_runs_polled(self, message: RunsPolled) -> None:
        self.runs = {run["id"]: run for run in message.runs}
        self.pipelines = {p["id"]: p for p in message.pipelines}
        for run_id in list(self.history.runs):
            if run_id not in self.runs:
                self.history.forget(run_id)
        self.loaded = True
        if self.home is not None:
            self.home.runs_changed(polled=True)

    def on_metrics_polled(self, message: MetricsPolled) -> None:
        changed = self.history.ingest(message.rows)
        if self.home is not None:
            self.home.metrics_changed(changed)

    def on_history_reset(self, message: HistoryReset) -> None:
        if not message.full and message.run_id in self.history.followed:
            return  # a light copy that crossed the request for the whole history on its way
        self.history.replace(message.run_id, message.history_version, message.rows, message.full,
                             message.extremes, message.columns)
        if self.home is not None:
            self.home.metrics_changed({message.run_id})

    def on_history_loading(self, message: HistoryLoading) -> None:
        run = self.history.runs.get(message.run_id)
        if run is not None and not run.full and message.run_id in self.history.followed:
            run.loading = message.rows
            if self.home is not None:
                self.home.metrics_changed({message.run_id})

    def follow(self, run_ids: Iterable[int]) -> None:
        """The runs being looked at (selected, overlaid): their whole histories are loaded; the others
        keep only their recent points and extremes."""
        wanted = set(run_ids)
        self.history.followed = wanted
        for run_id, run in self.history.runs.items():
            if run_id not in wanted and run.full:
                run.lighten()
        follower = self._follower
        if follower is None:
            return
        follower.followed = frozenset(wanted)
        asked = False
        for run_id in wanted:
            run = self.history.runs.get(run_id)
            if run is None or not run.full:
                follower.requests.put(run_id)
                asked = True
        if asked:
            self._wake.set()

    def on_store_failed(self, message: StoreFailed) -> None:
        self.notify(message.reason, title="runs.db", severity="error", timeout=30, markup=False)
        if self.home is not None and not self.loaded:  # instead of "loading runs.db…" for ever
            self.home.store_failed(message.reason)

    def on_log_read(self, message: LogRead) -> None:
        if self.home is not None:
            self.home.log_read(message)

    def on_samples_loaded(self, message: SamplesLoaded) -> None:
        if self.home is not None:
            self.home.samples_loaded(message)

    def on_gpu_read(self, message: GpuRead) -> None:
        self.gpu_unavailable = message.unavailable
        self.gpu_readings = message.readings
        self.gpu_pgids = message.pgids
        for reading in message.readings or []:
            hist = self.gpu_history.setdefault(reading.index, {"util": [], "mem": []})
            hist["util"].append(reading.utilization or 0.0)
            hist["mem"].append(100.0 * reading.memory_used / max(reading.memory_total, 1))
            for values in hist.values():
                del values[:-120]  # two minutes at one sample a second
        from console.screens.gpu import GpuScreen

        if self.screen_stack and isinstance(self.screen, GpuScreen):  # none while the app shuts down
            self.screen.refresh_readings()

    def on_action_done(self, message: ActionDone) -> None:
        self._wake.set()
        if message.error:
            if message.verb == "launch" and hasattr(self.screen, "launch_failed"):
                self.screen.launch_failed(message.error, message.fields or {})
                return
            self.notify(message.error, title=f"{message.verb} failed", severity="error", timeout=15, markup=False)
            return
        if message.warning:
            self.notify(message.warning, title=message.verb, severity="warning", timeout=15, markup=False)
        if message.note:
            self.notify(message.note, title=message.verb, markup=False)
            if message.verb == "launch":
                from console.screens.launch import LaunchScreen

                if isinstance(self.screen, LaunchScreen):
                    self.screen.dismiss(None)
            if message.pipeline_id is not None and self.home is not None:
                self.home.select_pipeline(message.pipeline_id)
            return
        said = DONE_SAYS.get(message.verb, message.verb + " done")
        if message.verb == "stop" and message.run_id in self.runs:
            from engine.run_facts import stop_outcome

            said = f"asked to stop: {stop_outcome(self.runs[message.run_id])}"
        pipeline = (self.runs.get(message.run_id) or {}).get("pipeline_id")
        if message.verb == "resume" and pipeline is not None:
            said = f"pipeline {pipeline} resumed"
        self.notify(f"run {message.run_id}: {said}", title=message.verb)
        if message.verb in ("launch", "resume"):
            from console.screens.launch import LaunchScreen

            if isinstance(self.screen, LaunchScreen):
                self.screen.dismiss(message.run_id)
            elif self.home is not None:
                self.home.select_run(message.run_id)

    # -- actions on runs (each runs in a thread: they import engine.launch) -----------------------------
    def run_of_pid(self, pid: int) -> int | None:
        """The active run whose process group a GPU process belongs to (None: not a run of this console)."""
        pgid = self.gpu_pgids.get(pid)
        if pgid is None:
            return None
        return next((run_id for run_id, run in self.runs.items()
                     if run.get("pgid") == pgid and run["status"] in ACTIVE), None)

    @work(thread=True, group="actions", exit_on_error=False)
    def launch_run(self, stage: str, recipe: str, overrides: list[str], accelerate_config: str,
                   num_processes: int | None) -> None:
        from engine.config import RecipeError
        from engine.data.records import DataError
        from engine.launch import prepare, start_detached

        try:
            run = prepare(stage, recipe, overrides, accelerate_config, num_processes, self.db_path)
            start_detached(run)
        except (RecipeError, DataError) as err:
            self.post_message(ActionDone("launch", None, str(err), getattr(err, "fields", {})))
            return
        except Exception as err:  # StoreError, OSError: the form must hear of it, or it waits forever
            self.post_message(ActionDone("launch", None, f"could not start the run: {err}"))
            return
        self.post_message(ActionDone("launch", run.run_id))

    @work(thread=True, group="actions", exit_on_error=False)
    def launch_pipeline(self, recipe: str, overrides: list[str], accelerate_config: str,
                        num_processes: int | None, through: str | None = None) -> None:
        from engine import pipeline
        from engine.config import RecipeError
        from engine.data.records import DataError

        try:
            pipeline_id, note = pipeline.create(recipe, overrides, through, accelerate_config, num_processes,
                                                self.db_path)
            pipeline.start_detached(pipeline_id, self.db_path)
        except (RecipeError, DataError) as err:
            self.post_message(ActionDone("launch", None, str(err), getattr(err, "fields", {})))
            return
        except Exception as err:  # StoreError, OSError
            self.post_message(ActionDone("launch", None, f"could not start the pipeline: {err}"))
            return
        said = f"pipeline {pipeline_id} started: its stages appear as they start, as one row that enter expands"
        self.post_message(ActionDone("launch", None, note=said + (f"\nnote: {note}" if note else ""),
                                     pipeline_id=pipeline_id))

    @work(thread=True, group="actions", exit_on_error=False)
    def resume_run(self, run_id: int) -> None:
        import json

        from engine.launch import prepare, start_detached

        run = self.runs.get(run_id)
        if run is None:
            self.post_message(ActionDone("resume", run_id, f"run {run_id} is gone"))
            return
        if run.get("pipeline_id") is not None:
            # A pipeline's stage resumes with its pipeline, which then runs the stages after it.
            from engine import pipeline

            try:  # said once its process has the pipeline (or why it has not)
                log, taken = pipeline.resume_detached(run["pipeline_id"], self.db_path)
            except Exception as err:  # RecipeError, RunFailed, StoreError, OSError
                self.post_message(ActionDone("resume", run_id, str(err)))
                return
            still = None if taken else f"pipeline {run['pipeline_id']}: its process is still starting; its log: {log}"
            self.post_message(ActionDone("resume", run_id, note=still))
            return
        if run["stage"] == "eval":  # one process, no accelerate: it goes on where it stopped, detached
            from engine.evaluate import start_detached_resume

            try:
                warnings = start_detached_resume(run_id, self.db_path)
            except Exception as err:  # RecipeError (its eval folder or judge is gone), StoreError, OSError
                self.post_message(ActionDone("resume", run_id, str(err)))
                return
            self.post_message(ActionDone("resume", run_id, warning="\n".join(warnings) or None))
            return
        launch = json.loads(run.get("launch") or "null") or {}
        accelerate = launch.get("accelerate_config")  # one: the home screen says so of a run without, not asks
        try:
            # The recipe recorded in runs.db (overrides applied, paths absolute): from any directory.
            prepared = prepare(run["stage"], run["recipe"], [], accelerate, launch.get("num_processes"),
                               self.db_path, resume_run=run_id)
            start_detached(prepared)
        except Exception as err:  # RecipeError, DataError, StoreError, OSError: every failure is reported
            self.post_message(ActionDone("resume", run_id, str(err)))
            return
        self.post_message(ActionDone("resume", run_id))

    @work(thread=True, group="actions", exit_on_error=False)
    def stop_run(self, run_id: int) -> None:
        from engine.launch import stop_grace_s, stop_run
        from engine.procs import kill_run_groups, same_group

        try:
            grace_s = self.stop_grace_s if self.stop_grace_s is not None else stop_grace_s()
            asked = stop_run(self.db_path, run_id)
        except Exception as err:  # RecipeError, StoreError, OSError
            self.post_message(ActionDone("stop", run_id, str(err)))
            return
        group = asked.group
        if asked.was_dead:  # nothing was there to stop: say so rather than "stop done"
            self.post_message(ActionDone("stop", run_id, note=f"run {run_id}: its processes were already gone; "
                                                             "closed as failed (r resumes it)"))
            return
        if asked.unrecorded:  # signalled, but the record cannot say so until runs.db takes writes again
            self.post_message(ActionDone("stop", run_id, note=f"run {run_id}: stop signalled, but runs.db could "
                                                             f"not record it ({asked.unrecorded})"))
        else:
            self.post_message(ActionDone("stop", run_id))
        # The grace period runs in this worker, so it survives screen changes (not a console restart:
        # then the run only got its SIGTERM, which is what lets it save).
        deadline = time.monotonic() + grace_s
        worker = get_current_worker()
        while group and same_group(*group) and time.monotonic() < deadline and not worker.is_cancelled:
            time.sleep(0.2)
        if group and same_group(*group) and not worker.is_cancelled:
            kill_run_groups(group[0], self.runs.get(run_id, {}).get("output_dir"))
            self.post_message(ActionDone("kill", run_id))

    @work(thread=True, group="actions", exit_on_error=False)
    def set_note(self, run_id: int, note: str) -> None:
        from engine.store import Store, StoreError

        try:
            with Store(self.db_path) as store:
                store.update_run(run_id, note=note or None)
        except (StoreError, sqlite3.Error, OSError) as err:  # a runs.db this user may read and not write
            self.post_message(ActionDone("note", run_id, str(err)))
            return
        self.post_message(ActionDone("note", run_id, note=f"run {run_id}: {note or 'note removed'}"))

    @work(thread=True, group="actions", exit_on_error=False)
    def delete_run(self, run_id: int, delete_files: bool) -> None:
        from engine.delete import delete_run
        from engine.store import StoreError

        try:  # the store refuses a run that is active now, whatever this console last saw
            kept = delete_run(self.db_path, run_id, delete_files)
        except (StoreError, sqlite3.Error, OSError) as err:  # a runs.db this user may read and not write
            self.post_message(ActionDone("delete", run_id, str(err)))
            return
        self.post_message(ActionDone("delete", run_id, warning=kept))  # forgotten, its folder kept: said beside

    @work(thread=True, group="actions", exit_on_error=False)
    def save_chat(self, record: dict[str, Any], screen: Screen | None = None) -> None:
        """A chat exchange (and its blind vote, if any) into runs.db (over the row `record["replaces"]` names,
        if any); `screen` hears its id."""
        from engine.store import EvalStore, Store

        try:
            with Store(self.db_path) as store:
                chat_id = EvalStore(store).add_chat(
                    record["left"], record["right"], record["settings"], record["transcript"], record["blind"],
                    record["vote"], record["a_is"], record.get("item_id"), record.get("category"),
                    record.get("replaces"))
        except Exception as err:  # StoreError, sqlite3.Error, OSError
            self.post_message(ActionDone("save chat", None, str(err)))
            return
        if screen is not None:
            screen.post_message(ChatSaved(chat_id, record.get("token")))
        what = "vote" if record["vote"] else "exchange"
        verb = "added to" if record.get("replaces") == chat_id else "saved as"
        self.post_message(ActionDone("save chat", None, note=f"{what} {verb} chat {chat_id} in {self.db_path}"))

    @work(thread=True, group="actions", exit_on_error=False)
    def export_scores(self) -> None:
        from console.exports import export_scores

        try:
            md, csv = export_scores(self.db_path, self.db_path.parent / "exports")
        except Exception as err:  # StoreError, sqlite3.Error, OSError
            self.post_message(ActionDone("export scores", None, str(err)))
            return
        self.post_message(ActionDone("export scores", None, note=f"score table written to {md} and {csv}"))

    @work(thread=True, group="actions", exit_on_error=False)
    def export_chats(self) -> None:
        from console.exports import export_chats
        from engine.store import EvalStore, Store

        try:
            with Store(self.db_path) as store:
                chats = EvalStore(store).chats()
            md, jsonl = export_chats(chats, self.db_path.parent / "exports")
        except Exception as err:  # StoreError, OSError
            self.post_message(ActionDone("export chats", None, str(err)))
            return
        self.post_message(ActionDone("export chats", None, note=f"{len(chats)} chats written to {md} and {jsonl}"))

    # -- navigation -----------------------------------------------------------------------------------
    def action_help(self) -> None:
        from console.screens.chat import ChatScreen
        from console.screens.gpu import GpuScreen
        from console.screens.help import HelpScreen
        from console.screens.launch import LaunchScreen
        from console.screens.runs import RunsScreen
        from console.screens.scores import ScoresScreen
        from console.widgets.chart import CHART_KEYS
        from console.widgets.log_view import LogView
        from console.widgets.run_table import RunTable
        from console.widgets.samples_view import SamplesView

        if isinstance(self.screen, HelpScreen):
            return
        # (screen, its sections): the screen help is asked on comes first, after the keys that work everywhere.
        screens = [
            (RunsScreen, [("Runs", RunsScreen.BINDINGS), ("Run table (when it has focus)", RunTable.BINDINGS),
                          ("Chart (when it has focus)", CHART_KEYS), ("Log (when it has focus)", LogView.BINDINGS),
                          ("Samples (when they have focus)", SamplesView.BINDINGS)]),
            (LaunchScreen, [("Launch", LaunchScreen.BINDINGS)]), (GpuScreen, [("GPUs", GpuScreen.BINDINGS)]),
            (ChatScreen, [("Chat", ChatScreen.BINDINGS)]), (ScoresScreen, [("Scores", ScoresScreen.BINDINGS)]),
        ]
        screens.sort(key=lambda entry: not isinstance(self.screen, entry[0]))  # stable: the rest keep their order
        # The app's keys that this screen takes for something else (the chat's q and n) are not "everywhere" here.
        taken = {key.strip(): b.action.removeprefix("app.") for b in getattr(self.screen, "BINDINGS", [])
                 for key in b.key.split(",")}
        everywhere = [b for b in self.BINDINGS
                      if all(taken.get(key.strip(), b.action) == b.action for key in b.key.split(","))]
        self.push_screen(HelpScreen([("Everywhere", everywhere)] + [s for _, group in screens for s in group]))

    def action_gpus(self) -> None:
        from console.screens.gpu import GpuScreen

        if not isinstance(self.screen, GpuScreen):
            self.push_screen(GpuScreen())

    def open_chat(self, left: str, right: str | None = None, key_env: str | None = None,
                  standalone: bool = False) -> None:
        """`standalone`: the chat `rlhf chat` opened, whose q ends the console (back to the shell it came from)."""
        from console.screens.chat import ChatScreen, ChatSettings

        settings = self.chat_settings if key_env is None else ChatSettings(key_env=key_env)
        self.push_screen(ChatScreen(left, right, settings, standalone=standalone))

    def on_chat_settings_chosen(self, message: ChatSettingsChosen) -> None:
        self.chat_settings = message.settings  # a chat opened later starts from them, not from the defaults

    def action_launch(self) -> None:
        from console.screens.launch import LaunchScreen

        if not isinstance(self.screen, LaunchScreen):
            self.push_screen(LaunchScreen(self.configs_dir, used=self.recipes_used()), self.launched)

    def recipes_used(self) -> list[str]:
        """The recipes of the runs shown, newest run first, each once: the launch form lists them too. Not a
        pipeline stage's (its recipe is the pipeline's copy, with `@sft` wiring only a pipeline takes)."""
        used = [run["recipe"] for _, run in sorted(self.runs.items(), reverse=True)
                if run.get("recipe") and run.get("pipeline_id") is None]
        return list(dict.fromkeys(used))

    def launched(self, run_id: int | None) -> None:
        if run_id is not None and self.home is not None:
            self.home.select_run(run_id)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        from console.keys import commands

        yield from super().get_system_commands(screen)
        # every action of the screen's keys, then the app's (generated: the palette finds what the keys do)
        own = getattr(screen, "commands", None)
        if own is not None:
            yield from own()
        shown = {b.action.removeprefix("app.") for b in getattr(screen, "BINDINGS", [])}
        yield from commands(self, self.BINDINGS, skip=shown | {"quit"})


def default_configs_dir(db_path: Path) -> Path:
    """Where the launch form finds recipes: ./configs, else the configs folder beside runs.db (a console
    started elsewhere with --db still finds the project's recipes), as an absolute path."""
    for candidate in (Path("configs"), db_path.parent / "configs"):
        if candidate.is_dir():
            return candidate.resolve()
    return Path("configs").resolve()


def run_console(db: str | None = None, chat: tuple[str, str | None, str] | None = None) -> int:
    """Entry point of `rlhf console` (and of `rlhf` with no command)."""
    import sys

    # sqlite-utils imports pandas if it can (0.3 s here) only to convert pandas values on insert, which
    # the console never does: it starts without it.
    sys.modules.setdefault("pandas", None)
    db_path = Path(db or os.environ.get("RLHF_DB", "runs.db")).resolve()
    from engine.store import default_db_path

    here = Path(default_db_path()).resolve()  # what `rlhf runs` reads in the shell the console was started from
    project = db_path.parent
    if not Path("configs").is_dir() and (project / "configs").is_dir() and project != Path.cwd():
        # Started elsewhere with --db: the project's recipes name their model and data relative to the project
        # folder, so that is where the console works from (the launch form's checks and its launches).
        if chat is not None:  # model folders named relative to where the command was typed
            left, right, key_env = chat
            chat = (*(str(Path(m).resolve()) if m and not m.isdigit() and Path(m).exists() else m  # a run id stays
                      for m in (left, right)), key_env)
        os.chdir(project)
    app = RlhfConsole(db_path, chat=chat)
    app.run()
    said = still_going(app.runs, db_path, here) if chat is None and not app.return_code else None
    if said:
        print(said)
    return app.return_code or 0  # 1 when it ended on an error (its traceback is printed)


def still_going(runs: dict[int, dict], db_path: Path, default_db: Path) -> str | None:
    """What a quit leaves running, said as the console ends (they run on in processes of their own: a newcomer
    who quit with a run going was told nothing), or None. `default_db`: the runs.db a command typed in the
    console's shell reads without --db."""
    going = [run for run in runs.values() if run["status"] in ("pending", "running")]
    if not going:
        return None
    which = ", ".join(f"{run['id']} ({run['stage']})" for run in sorted(going, key=lambda r: r["id"]))
    db = "" if db_path == default_db else f" --db {db_path}"
    return (f"run{'s' if len(going) > 1 else ''} {which} still going, in {'their' if len(going) > 1 else 'its'} own "
            f"process{'es' if len(going) > 1 else ''}: rlhf runs{db} shows them, rlhf console{db} watches them again")
