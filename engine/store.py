"""runs.db: the one place runs, metrics, checkpoints and samples live. Shared by engine and console.

SQLite in WAL mode, so readers never block the writer. Every write is one `BEGIN IMMEDIATE`
transaction: SQLite admits one writer at a time and `metrics.seq` is assigned inside it, so rows commit
in seq order and a reader that polls `seq > last` can neither miss nor repeat a row. `run_seq` numbers a
run's own rows 1, 2, 3… with no gap, which is what lets a test (or a user) check that nothing was lost.

Only light imports here: the console reads the store without loading torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import sqlite3
import threading
import time
from array import array
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from engine.procs import may_access, process_start, user_name


def _light_sqlite_utils() -> Any:
    """sqlite_utils without pandas and numpy: it imports them when they are installed (transformers brings
    them) for features this store never uses, ~0.45 s of every `rlhf runs`. They stay importable for
    everything else: only this import sees them missing. Only while this is the process's one thread: the
    hiding is seen by every thread, and the console (which imports this in a worker) imports numpy for its
    chart at the same time; it needs numpy anyway."""
    import sys

    if "sqlite_utils" in sys.modules:
        return sys.modules["sqlite_utils"]
    alone = threading.active_count() == 1
    hidden = [name for name in ("pandas", "numpy") if name not in sys.modules] if alone else []
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError
    try:
        import sqlite_utils as module
    finally:
        for name in hidden:
            if sys.modules.get(name) is None:
                del sys.modules[name]
    return module


sqlite_utils = _light_sqlite_utils()

log = logging.getLogger(__name__)
# How long a write waits for another writer before it fails (a test can make it short).
BUSY_TIMEOUT_S = float(os.environ.get("RLHF_DB_BUSY_S", 60.0))
WAL_LIMIT_BYTES = 64 * 1024 * 1024
RUN_MARKER = ".rlhf-run.json"  # in each run folder: which runs.db (db_id) and run it belongs to
# What an orphaned run's error says, and what to do: where its checkpoints are, it continues from them.
ORPHANED = ("its processes are gone and nothing recorded how it ended (a crash, kill -9 or a reboot): resume "
            "it to continue from its newest checkpoint, where it saved one")
ORPHANED_EVAL = ("its processes are gone and nothing recorded how it ended (a crash, kill -9 or a reboot): resume "
                 "it to continue where it stopped (its answers and verdicts so far are kept)")
RUN_STATUSES = ("pending", "running", "done", "failed", "stopped", "diverged")


def _checkpoint_folder(path: str, output_dir: str | None) -> Path:
    """A checkpoint row's folder. Rows written before paths were absolute hold them relative to the
    directory the run was started from; a checkpoint always lies in its run's folder."""
    folder = Path(path)
    return folder if folder.is_absolute() or not output_dir else Path(output_dir) / folder.name


class StoreError(RuntimeError):
    pass


def _v1(db: sqlite_utils.Database) -> None:
    db["runs"].create(
        {
            "id": int,
            "name": str,
            "stage": str,
            "recipe": str,  # path of the recipe file as given
            "config": str,  # resolved recipe, JSON
            "overrides": str,  # JSON list of --set items
            "status": str,
            "pid": int,
            "pgid": int,
            "host": str,
            "world_size": int,
            "exit_code": int,
            "error": str,
            "created": float,
            "started": float,
            "ended": float,
            "output_dir": str,
            "total_steps": int,
            "step": int,
            "history_version": int,  # bumped when a resume drops metrics: readers reload the run
        },
        pk="id",
        not_null={"stage", "status", "created"},
        defaults={"status": "pending", "history_version": 0},
    )
    db.execute(
        """CREATE TABLE metrics (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id INTEGER NOT NULL REFERENCES runs(id),
            run_seq INTEGER NOT NULL,
            step INTEGER NOT NULL,
            name TEXT NOT NULL,
            value REAL,
            wall_time REAL NOT NULL,
            UNIQUE (run_id, run_seq)
        )"""
    )
    db.execute("CREATE INDEX metrics_run_name ON metrics(run_id, name, step)")
    db["checkpoints"].create(
        {"id": int, "run_id": int, "step": int, "path": str, "metrics": str, "full_state": int, "created": float},
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
    )
    db["checkpoints"].create_index(["run_id", "step"])
    db["samples"].create(
        {"id": int, "run_id": int, "step": int, "prompt": str, "response": str, "score": float, "created": float},
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
    )
    db["samples"].create_index(["run_id", "step"])


def _v2(db: sqlite_utils.Database) -> None:
    # How the run was launched (accelerate config, processes), so that a console can resume it the same
    # way; and when a stop was asked for, so that a run killed after its grace period counts as stopped.
    db["runs"].add_column("launch", str)
    db["runs"].add_column("stop_requested", float)


def _v3(db: sqlite_utils.Database) -> None:
    # SQLite hands a deleted run's id to the next run; its folder (kept unless asked) would then hold two
    # runs' logs and checkpoints. The highest id ever given out is kept here instead.
    db["meta"].create({"key": str, "value": int}, pk="key")
    last = db.execute("SELECT COALESCE(MAX(id), 0) FROM runs").fetchone()[0]
    db["meta"].insert({"key": "last_run_id", "value": last})


def _v4(db: sqlite_utils.Database) -> None:
    # When the run's group leader started: a stop must not signal a group that merely reuses its number.
    db["runs"].add_column("pgid_started", int)


def _v5(db: sqlite_utils.Database) -> None:
    # When a pending or running run was found with its processes gone and closed as failed: such a run
    # can be resumed although no exit code was ever recorded for it.
    db["runs"].add_column("orphaned", float)
    # This file's identity, written into every run folder it hands out (RUN_MARKER): two runs.db files
    # with the same output_root never share a folder, and one never deletes or resumes the other's.
    db["meta"].insert({"key": "db_id", "value": random.getrandbits(62)})
    for run_id, output_dir in db.execute("SELECT id, output_dir FROM runs").fetchall():
        folder = Path(output_dir) if output_dir else None
        if folder is not None and folder.is_absolute() and folder.is_dir() and not (folder / RUN_MARKER).exists():
            _write_marker(folder, db.execute("SELECT value FROM meta WHERE key = 'db_id'").fetchone()[0], run_id)
    # Judging checkpoints: each eval run's items with the answer it generated, the judge's verdict per item,
    # every judge reply keyed on its full input (a re-run asks nothing twice), pairwise verdicts in both
    # orders, and chat exchanges with their blind votes.
    db.execute(
        """CREATE TABLE eval_items (
            run_id INTEGER NOT NULL REFERENCES runs(id),
            item_id INTEGER NOT NULL,
            category TEXT NOT NULL,
            class TEXT NOT NULL,
            question TEXT NOT NULL,
            reference TEXT NOT NULL,
            judge_prompt TEXT,
            answer TEXT,
            answer_tokens INTEGER,
            finished TEXT,
            answered REAL,
            PRIMARY KEY (run_id, item_id)
        )"""
    )
    db.execute(
        """CREATE TABLE judgments (
            run_id INTEGER NOT NULL REFERENCES runs(id),
            item_id INTEGER NOT NULL,
            judge TEXT NOT NULL,
            score REAL,
            status TEXT NOT NULL,
            problem TEXT,
            reply TEXT,
            cache_key TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            calls INTEGER,
            created REAL NOT NULL,
            PRIMARY KEY (run_id, item_id)
        )"""
    )
    db.execute(
        """CREATE TABLE judge_cache (
            key TEXT PRIMARY KEY,
            judge TEXT NOT NULL,
            request TEXT NOT NULL,
            reply TEXT NOT NULL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            created REAL NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE pairwise (
            id INTEGER PRIMARY KEY,
            a_run INTEGER NOT NULL,
            b_run INTEGER NOT NULL,
            item_id INTEGER NOT NULL,
            first TEXT NOT NULL,
            judge TEXT NOT NULL,
            verdict TEXT,
            reply TEXT,
            cache_key TEXT,
            created REAL NOT NULL,
            UNIQUE (a_run, b_run, item_id, first, judge)
        )"""
    )
    db.execute(
        """CREATE TABLE chats (
            id INTEGER PRIMARY KEY,
            created REAL NOT NULL,
            left_model TEXT NOT NULL,
            right_model TEXT NOT NULL,
            settings TEXT NOT NULL,
            transcript TEXT NOT NULL,
            blind INTEGER NOT NULL DEFAULT 0,
            vote TEXT,
            a_is TEXT,
            item_id INTEGER,
            category TEXT
        )"""
    )


def _v6(db: sqlite_utils.Database) -> None:
    # A user's note on a run (the console's N): ten runs of one recipe told apart.
    db["runs"].add_column("note", str)


def _v7(db: sqlite_utils.Database) -> None:
    # What max_length did to each data source ({path: {kept, truncated, dropped}}), JSON: a run's record
    # says on what data it trained, not only what its recipe listed.
    db["runs"].add_column("data_fates", str)


def _v8(db: sqlite_utils.Database) -> None:
    # `rlhf pipeline`: SFT, RM, PPO and the evaluation, each a run of its own that names its pipeline.
    db["pipelines"].create(
        {
            "id": int,
            "name": str,
            "recipe": str,  # the recipe file as given, absolute
            "config": str,  # the recipe resolved at creation (overrides applied, paths absolute), JSON
            "overrides": str,  # JSON list of --set items, applied to every stage
            "through": str,  # the last stage: sft, rm, ppo or eval
            "launch": str,  # JSON: accelerate config (absolute) and process count
            "status": str,
            "pid": int,
            "pid_started": float,
            "created": float,
            "ended": float,
            "error": str,
        },
        pk="id",
        not_null={"status", "created"},
        defaults={"status": "pending"},
    )
    db["runs"].add_column("pipeline_id", int)
    # Each stretch a run trained, [[start, end], ...] as JSON: a resumed run keeps its first start and
    # shows where it was interrupted.
    db["runs"].add_column("segments", str)


def _v9(db: sqlite_utils.Database) -> None:
    # The machine a pipeline's process runs on: only that machine can tell that it died (as a run's host).
    db["pipelines"].add_column("host", str)
    # A launched run's supervisor (the process that records its exit): a look can tell that it died, and
    # that an exit it never recorded never will be.
    db["runs"].add_column("supervisor_pid", int)
    db["runs"].add_column("supervisor_started", float)


def _v10(db: sqlite_utils.Database) -> None:
    # ppo.train_head became optional (its default follows lora), and true with lora is refused: records
    # made before wrote true beside lora, a head that never trained. Say what those runs did, so that they
    # still resume.
    for table in ("runs", "pipelines"):
        for row in db.execute(f"SELECT id, config FROM {table} WHERE config LIKE '%train_head%'").fetchall():
            config = json.loads(row[1])
            ppo = config.get("ppo") if isinstance(config, dict) else None
            if isinstance(ppo, dict) and ppo.get("lora") is not None and ppo.get("train_head") is True:
                ppo["train_head"] = None
                db.execute(f"UPDATE {table} SET config = ? WHERE id = ?", [json.dumps(config), row[0]])


def _v11(db: sqlite_utils.Database) -> None:
    # The exit code a launched trainer meant when it failed (2: its input was bad): `accelerate launch`
    # above it ends 1 whatever its child's code, and the supervisor records what it sees.
    db["runs"].add_column("failure_code", int)


def _v12(db: sqlite_utils.Database) -> None:
    # What each resume with --allow-change changed, and from which step: [{"step", "at", "set", "fields"}]
    # as JSON. The run's config and overrides are its latest: without this they read as if from step 1.
    db["runs"].add_column("changes", str)


def _v13(db: sqlite_utils.Database) -> None:
    # A warm-up on a constant schedule (transformers' reads none) and a KL target for a coefficient of 0 (the
    # controller scales it) became refused: records made before say what those runs did, so they still resume.
    for table in ("runs", "pipelines"):
        for row_id, text in db.execute(f"SELECT id, config FROM {table} WHERE config IS NOT NULL").fetchall():
            try:
                config = json.loads(text)
            except ValueError:
                continue
            if isinstance(config, dict) and _as_trained(config):
                db.execute(f"UPDATE {table} SET config = ? WHERE id = ?", [json.dumps(config), row_id])


def _as_trained(config: dict[str, Any]) -> bool:
    """Rewrite, in place, the settings of a recorded recipe that had no effect as what took effect; whether any."""
    changed = False
    stages = [config[stage] for stage in ("sft", "rm") if isinstance(config.get(stage), dict)]
    for train in [s["train"] for s in stages if isinstance(s.get("train"), dict)]:
        if train.get("lr_scheduler", "cosine") == "constant" and (train.get("warmup_ratio") or 0) > 0:
            train["warmup_ratio"], changed = 0.0, True
    ppo = config.get("ppo")
    if isinstance(ppo, dict):
        if ppo.get("lr_scheduler", "constant") == "constant" and (ppo.get("warmup_steps") or 0) > 0:
            ppo["warmup_steps"], changed = 0, True
        if ppo.get("init_kl_coef", 0.05) == 0 and ppo.get("target_kl", 6.0) is not None:
            ppo["target_kl"], changed = None, True
    return changed


# Append only: migration i brings a database from version i to i + 1.
MIGRATIONS = [_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8, _v9, _v10, _v11, _v12, _v13]
SCHEMA_VERSION = len(MIGRATIONS)


def _closed_at(segments: str | None, ended: float | None) -> str | None:
    """The run's segments with a stretch a kill cut short (never closed) ending at the run's recorded end,
    which a claim for resume clears; None when there is nothing to close."""
    try:
        spans = json.loads(segments or "[]")
    except ValueError:
        return None
    if ended is None or not spans or not isinstance(spans[-1], list) or len(spans[-1]) != 2 or spans[-1][1] is not None:
        return None
    spans[-1][1] = max(ended, spans[-1][0] or ended)
    return json.dumps(spans)


def _write_marker(folder: Path, db_id: int, run_id: int, db_path: Path | None = None) -> None:
    """`db_path`: the file that handed the folder out, so that a copy of it (same db_id) is told apart."""
    tmp = folder / f"{RUN_MARKER}.tmp"
    mark: dict[str, Any] = {"db_id": db_id, "run_id": run_id}
    if db_path is not None:
        mark["db"] = str(db_path.resolve())
    tmp.write_text(json.dumps(mark), encoding="utf-8")
    os.replace(tmp, folder / RUN_MARKER)


def folder_owner(folder: str | os.PathLike) -> dict[str, int] | None:
    """The (db_id, run_id) a run folder's marker names, or None if it has none (or it cannot be read)."""
    try:
        return json.loads((Path(folder) / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _locked(err: sqlite3.OperationalError) -> bool:
    return "locked" in str(err) or "busy" in str(err)


def _ensure_wal(conn: sqlite3.Connection, path: str | os.PathLike) -> None:
    """Switch the file to WAL once, whoever opens it first; every later open only reads the mode.

    The switch needs an exclusive lock, and SQLite does not call the busy handler when waiting could
    deadlock (this connection holds a shared lock while another writer holds a reserved one): it returns
    SQLITE_BUSY at once. So a busy switch is retried, with jittered back-off, for up to BUSY_TIMEOUT_S.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.002
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            conn.execute("PRAGMA journal_mode = WAL").fetchone()
            return  # WAL, or whatever the file system allows (the store works in either)
        except sqlite3.OperationalError as err:
            if not _locked(err) or time.monotonic() > deadline:
                raise StoreError(f"{path}: cannot open runs.db: {err}") from None
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.25)


def connect(path: str | os.PathLike) -> sqlite_utils.Database:
    """The one way runs.db is opened (engine, console, follower, tests): busy timeout, WAL, foreign keys."""
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    _ensure_wal(conn, path)
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA synchronous = NORMAL")  # safe in WAL: a power cut may lose the last commits, never corrupt
    db.execute("PRAGMA foreign_keys = ON")
    # The WAL keeps the size of its largest burst (a VACUUM writes the whole file into it) until every
    # connection closes: each checkpoint that starts it over cuts it back to this
    db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
    return db


def _access_denied(path: Path) -> str | None:
    """Why this user may not read `path` (or the -shm and -wal files beside it), or None."""
    for file in (path, path.with_name(path.name + "-shm"), path.with_name(path.name + "-wal")):
        if file.exists() and not may_access(file, os.R_OK):
            info = file.stat()
            return (f"permission denied: {file.name} is {user_name(info.st_uid)}'s (mode {info.st_mode & 0o777:o}); "
                    "to share runs.db, its owner can give your group read and write access to it, its -wal and "
                    "-shm files and its folder")
    return None


class Store:
    """A connection to runs.db. Safe to share between threads (calls are serialised by a lock)."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        """`create`: make an empty runs.db where there is none. A command about a run that exists (a resume,
        a stop) passes False: in the wrong folder it made a stray empty runs.db and said only "no run 6"."""
        self.path = Path(path)
        if not create and not self.path.exists():
            raise StoreError(no_database_here(self.path))
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # For its owner only (SQLite gives its -wal and -shm files the same mode): a shared GPU server's
            # other users have no business reading runs, chats and judge replies.
            try:
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError as err:
                raise StoreError(f"{self.path}: cannot create runs.db ({err.strerror}); give --db a path you can "
                                 "write") from None
        try:
            self.db = connect(self.path)
            self._lock = threading.RLock()
            self._migrate()
        except sqlite3.DatabaseError as err:  # not a database, truncated, malformed, or its folder is read-only
            denied = _access_denied(self.path)
            if denied:  # a teammate's runs.db: damage is the wrong thing to suggest (moving it aside loses it)
                raise StoreError(f"{self.path}: {denied}") from None
            raise StoreError(
                f"{self.path}: cannot be opened as runs.db ({err}). If the file is damaged, move it aside and "
                "start a new one (the runs' folders and checkpoints are untouched); if its folder is read-only, "
                "SQLite cannot create the -wal and -shm files it needs beside it: copy it somewhere writable"
            ) from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema ---------------------------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """One immediate write transaction: takes the write lock up front, so it waits instead of failing."""
        with self._lock:
            self.db.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.conn.rollback()
                raise
            self.db.conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {version} is newer than this rlhf-console knows "
                    f"({SCHEMA_VERSION}); upgrade rlhf-console to open it"
                )
            for target, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                migration(db)
                db.execute(f"PRAGMA user_version = {target}")

    @property
    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    # -- runs -----------------------------------------------------------------------------------------
    def create_run(
        self,
        *,
        stage: str,
        name: str,
        recipe: str,
        config: str,
        overrides: Iterable[str] = (),
        output_root: str = "runs",
        pipeline_id: int | None = None,
        launch: str | None = None,
        registrar: int | None = None,
    ) -> int:
        """`registrar`: the process that registers the run, the run's until it starts one (its supervisor,
        its own trainer), as a resume's claimer is: one killed in between leaves a row any look closes, not
        one pending for good. `launch` goes in the same write: a stop signals the pid of a row with none (an
        in-process run), and the registrar of a launched run may be a console."""
        root = Path(output_root).resolve()
        with self._write() as db:
            table = db["runs"]
            last = db.execute("SELECT value FROM meta WHERE key = 'last_run_id'").fetchone()[0]
            top = db.execute("SELECT COALESCE(MAX(id), 0) FROM runs").fetchone()[0]
            run_id = max(last, top) + 1
            # A folder another runs.db handed out (or anything already there) is skipped, never shared.
            while (root / str(run_id)).exists():
                run_id += 1
            (root / str(run_id)).mkdir(parents=True, mode=0o700)
            _write_marker(root / str(run_id), self.db_id, run_id, self.path)
            db.execute("UPDATE meta SET value = ? WHERE key = 'last_run_id'", [run_id])
            table.insert(
                {
                    "id": run_id,
                    "stage": stage,
                    "name": name,
                    "recipe": recipe,
                    "config": config,
                    "overrides": json.dumps(list(overrides)),
                    "status": "pending",
                    "created": time.time(),
                    "host": socket.gethostname(),
                    "pid": registrar,
                    "pgid_started": process_start(registrar) if registrar else None,
                    "pipeline_id": pipeline_id,
                    "launch": launch,
                }
            )
            # Absolute: a console started elsewhere must find (and, asked to, delete) the same folder.
            table.update(run_id, {"output_dir": str(root / str(run_id))})
        return int(run_id)

    @property
    def db_id(self) -> int:
        with self._lock:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'db_id'").fetchone()
        if row is None:  # a file from a development build of schema 5 that had no identity yet
            with self._write() as db:
                db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('db_id', ?)", [random.getrandbits(62)])
                row = db.execute("SELECT value FROM meta WHERE key = 'db_id'").fetchone()
        return int(row[0])

    def foreign_folder(self, run: Mapping[str, Any]) -> str | None:
        """Why the run's folder is not this run's (its marker names another runs.db or run), or None. A
        folder without a marker (older than schema 5) is taken as the run's."""
        owner = folder_owner(run["output_dir"]) if run.get("output_dir") else None
        if owner is None:
            return None
        original = self._copied_from(owner)
        if original is not None:
            return (f"{run['output_dir']} belongs to run {owner.get('run_id')} of {original}, of which {self.path} "
                    "is a copy (a copied workspace's runs.db still names the original's folders)")
        if owner.get("db_id") == self.db_id and owner.get("run_id") == run["id"]:
            return None
        return (f"{run['output_dir']} belongs to run {owner.get('run_id')} of another runs.db, not to run "
                f"{run['id']} of {self.path}")

    def owns_folder(self, run: Mapping[str, Any]) -> bool:
        """The run's folder carries this runs.db's marker for this run: only then may its files be deleted,
        its processes signalled or its checkpoints resumed from."""
        owner = folder_owner(run["output_dir"]) if run.get("output_dir") else None
        return (owner is not None and owner.get("db_id") == self.db_id and owner.get("run_id") == run["id"]
                and self._copied_from(owner) is None)

    def _copied_from(self, owner: Mapping[str, Any]) -> str | None:
        """The runs.db a folder's marker names where it is another file than this one with this one's identity:
        this file is a copy of it (`cp -a` of a workspace), and the folder is the original's. None where the
        named file is this one, is gone (moved), or is not on this machine's paths (a shared disk mounted
        elsewhere): nothing tells a copy then."""
        named = owner.get("db")
        if not named or owner.get("db_id") != self.db_id:
            return None
        try:
            if os.path.samefile(named, self.path):
                return None
        except OSError:
            return None
        # Another file there: the original only if it has this identity (a runs.db moved away, and a new one
        # made where it was, is not the folder's owner; this one, moved, still is)
        try:
            conn = sqlite3.connect(f"{Path(named).as_uri()}?mode=ro", uri=True, timeout=1.0)
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = 'db_id'").fetchone()
            finally:
                conn.close()
        except (sqlite3.Error, ValueError):
            return None
        return str(named) if row is not None and int(row[0]) == self.db_id else None

    def claim_for_resume(self, run_id: int, change: Mapping[str, Any] | None = None,
                         untrained: bool = False) -> bool:
        """Make an ended run pending again, in one transaction: of two resumes at once only one wins.
        `change`: fields the resume changes (an allowed --set: its config and overrides), written with it.
        `untrained`: a start over, only if the run has still trained no step (another resume may have since
        it was looked at: then starting over would train its steps again over its checkpoints).

        A launched run counts as ended only once its supervisor has recorded the exit code (its trainer
        writes "stopped" before its processes are gone), or once it was found with its processes gone
        (`close_orphan`)."""
        # The claiming process is the run's until it starts one (its supervisor, its own trainer): a claimer
        # that dies before then leaves a row any look closes, not one pending for good.
        me = os.getpid()
        with self._write() as db:
            row = db.conn.execute("SELECT segments, ended FROM runs WHERE id = ?", [run_id]).fetchone()
            segments = _closed_at(row[0], row[1]) if row is not None else None
            changed = db.conn.execute(
                "UPDATE runs SET status = 'pending', exit_code = NULL, failure_code = NULL, error = NULL, "
                "ended = NULL, orphaned = NULL, stop_requested = NULL, pid = ?, pgid = NULL, pgid_started = ?, "
                "host = ?, segments = COALESCE(?, segments) WHERE id = ? "
                "AND status NOT IN ('pending', 'running') "
                "AND (launch IS NULL OR exit_code IS NOT NULL OR orphaned IS NOT NULL)"
                + (" AND COALESCE(step, 0) = 0" if untrained else ""),
                [me, process_start(me), socket.gethostname(), segments, run_id]).rowcount
            if changed == 1 and change:
                db.conn.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in change)} WHERE id = ?",
                                [*change.values(), run_id])
        return changed == 1

    def close_orphan(self, run_id: int, seen: Mapping[str, Any] | None = None, ended: float | None = None,
                     why: str = ORPHANED) -> bool:
        """Record that a pending or running run's processes are gone without an exit on record. `seen`: the
        row whose processes were found gone; if the run has other processes by now (it was closed and
        resumed meanwhile), it is left alone. `ended`: its last sign of life (else now). `why`: its error,
        unless one is recorded."""
        same = ""
        now = time.time()
        # An evaluation has no checkpoints: what it keeps is its answers and verdicts.
        params: list[Any] = [now if ended is None else ended, now, ORPHANED_EVAL if why == ORPHANED else why, why,
                             run_id]
        if seen is not None:
            same = " AND pid IS ? AND pgid IS ? AND pgid_started IS ? AND host IS ?"
            params += [seen.get("pid"), seen.get("pgid"), seen.get("pgid_started"), seen.get("host")]
        with self._write() as db:
            changed = db.conn.execute(
                "UPDATE runs SET status = 'failed', ended = ?, orphaned = ?, "
                "error = COALESCE(error, CASE WHEN stage = 'eval' THEN ? ELSE ? END) "
                "WHERE id = ? AND status IN ('pending', 'running')" + same, params).rowcount
        return changed == 1

    def close_unrecorded_exit(self, run_id: int, seen: Mapping[str, Any]) -> bool:
        """A launched run whose trainer recorded its end (stopped, done, failed) but whose supervisor died
        before recording the exit: its record is final as it stands, with the exit code its trainer's end
        means (as a run in its own process records it: done 0, stopped 143, failed 1, or 2 where its input
        was bad: the code it meant, `failure_code`). Not `orphaned`: that
        marks a look's guess at a status, which a late supervisor replaces. `seen`: the row found so; a run
        resumed meanwhile is left alone."""
        with self._write() as db:
            changed = db.conn.execute(
                "UPDATE runs SET exit_code = CASE status WHEN 'done' THEN 0 WHEN 'stopped' THEN 143 "
                "ELSE COALESCE(failure_code, 1) END "
                "WHERE id = ? AND status NOT IN ('pending', 'running') AND exit_code IS NULL AND orphaned IS NULL "
                "AND pgid IS ? AND pgid_started IS ?",
                [run_id, seen.get("pgid"), seen.get("pgid_started")]).rowcount
        return changed == 1

    def mark_stop_requested(self, run_id: int) -> tuple[int | None, int | None]:
        """Write down a stop and return the run's (process group, its start), in one transaction with
        `set_process`'s:
        either the stopper sees the group and signals it, or the supervisor sees the stop and passes it on.
        """
        with self._write() as db:
            db.conn.execute("UPDATE runs SET stop_requested = ? WHERE id = ? AND status IN ('pending', 'running')",
                            [time.time(), run_id])
            pgid, started = db.execute("SELECT pgid, pgid_started FROM runs WHERE id = ?", [run_id]).fetchone()
            return pgid, started

    def set_supervisor(self, run_id: int, pid: int, started: int | None) -> None:
        """A detached run's supervisor, recorded until it records the run's own process group."""
        with self._write() as db:
            db.conn.execute("UPDATE runs SET pid = ?, pgid_started = ?, host = ? WHERE id = ? AND pgid IS NULL",
                            [pid, started, socket.gethostname(), run_id])

    def set_process(self, run_id: int, pid: int, pgid: int, started: int | None = None,
                    supervisor: tuple[int, int | None] | None = None) -> bool:
        """Record the run's processes (`started`: the leader's start time; `supervisor`: the pid and start
        of the process that records its exit); returns whether a stop was asked for before they existed."""
        with self._write() as db:
            # The machine too: a run resumed on another node than the one that registered it is looked at
            # (and stopped) there, never judged gone by this one.
            db.conn.execute("UPDATE runs SET pid = ?, pgid = ?, pgid_started = ?, host = ?, supervisor_pid = ?, "
                            "supervisor_started = ? WHERE id = ?",
                            [pid, pgid, started, socket.gethostname(), *(supervisor or (None, None)), run_id])
            return db.execute("SELECT stop_requested FROM runs WHERE id = ?", [run_id]).fetchone()[0] is not None

    def update_run(self, run_id: int, **fields: Any) -> None:
        if "status" in fields and fields["status"] not in RUN_STATUSES:
            raise StoreError(f"unknown run status {fields['status']!r}")
        with self._write() as db:
            db["runs"].update(run_id, fields)

    def run(self, run_id: int) -> dict[str, Any]:
        with self._lock:
            try:
                return self.db["runs"].get(run_id)
            except sqlite_utils.db.NotFoundError:
                raise StoreError(f"{self.path}: no run {run_id}") from None

    def runs(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db["runs"].rows_where(order_by="id"))

    # -- pipelines ------------------------------------------------------------------------------------
    def create_pipeline(self, *, name: str, recipe: str, config: str, overrides: Iterable[str], through: str,
                        launch: Mapping[str, Any]) -> int:
        with self._write() as db:
            return int(db["pipelines"].insert({
                "name": name, "recipe": recipe, "config": config, "overrides": json.dumps(list(overrides)),
                "through": through,
                "launch": json.dumps(dict(launch)), "status": "pending", "created": time.time(),
            }).last_pk)

    def pipeline(self, pipeline_id: int) -> dict[str, Any]:
        with self._lock:
            try:
                return self.db["pipelines"].get(pipeline_id)
            except sqlite_utils.db.NotFoundError:
                raise StoreError(f"{self.path}: no pipeline {pipeline_id}") from None

    def pipelines(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db["pipelines"].rows_where(order_by="id"))

    def update_pipeline(self, pipeline_id: int, **fields: Any) -> None:
        if "status" in fields and fields["status"] not in RUN_STATUSES:
            raise StoreError(f"unknown pipeline status {fields['status']!r}")
        with self._write() as db:
            db["pipelines"].update(pipeline_id, fields)

    def claim_pipeline(self, pipeline_id: int, pid: int, started: int | None) -> bool:
        """Mark the pipeline running in process `pid`, in one transaction: of two processes resuming it at
        once, only one does; the other finds it running in the first (False)."""
        with self._write() as db:
            changed = db.conn.execute(
                "UPDATE pipelines SET status = 'running', pid = ?, pid_started = ?, host = ?, ended = NULL, "
                "error = NULL WHERE id = ? AND (status NOT IN ('pending', 'running') OR pid IS NULL OR pid = ?)",
                [pid, started, socket.gethostname(), pipeline_id, pid]).rowcount
        return changed == 1

    def close_orphan_pipeline(self, pipeline_id: int, seen: Mapping[str, Any]) -> bool:
        """Record that a pending or running pipeline's process is gone without an end on record. `seen`: the
        row whose process was found gone; a pipeline resumed meanwhile (another process) is left alone."""
        with self._write() as db:
            changed = db.conn.execute(
                "UPDATE pipelines SET status = 'failed', ended = ?, error = COALESCE(error, ?) "
                "WHERE id = ? AND status IN ('pending', 'running') AND pid IS ? AND pid_started IS ? AND host IS ?",
                [time.time(), f"its process (pid {seen.get('pid')}) is gone and nothing recorded how it ended: "
                              f"rlhf pipeline --resume {pipeline_id} --db {Path(self.path).resolve()} continues it",
                 pipeline_id, seen.get("pid"), seen.get("pid_started"), seen.get("host")]).rowcount
        return changed == 1

    def pipeline_runs(self, pipeline_id: int) -> list[dict[str, Any]]:
        """The pipeline's runs, oldest first (a stage started over has several; the newest counts)."""
        with self._lock:
            return list(self.db["runs"].rows_where("pipeline_id = ?", [pipeline_id], order_by="id"))

    def delete_runs(self, run_ids: Sequence[int]) -> None:
        """Forget runs and everything they logged (their files on disk are the caller's business), all or none:
        refused, in the same transaction, where one is unknown or it or its pipeline is active (resumed since
        the caller looked)."""
        with self._write() as db:
            for run_id in run_ids:
                row = db.execute("SELECT status, pipeline_id FROM runs WHERE id = ?", [run_id]).fetchone()
                if row is None:
                    raise StoreError(f"{self.path}: no run {run_id}")
                if row[0] in ("pending", "running"):
                    raise StoreError(f"run {run_id} is {row[0]}: stop it before deleting it")
                # A pipeline resumed since would read this stage's record and export
                pipeline = row[1] is not None and db.execute(
                    "SELECT status FROM pipelines WHERE id = ?", [row[1]]).fetchone()
                if pipeline and pipeline[0] in ("pending", "running"):
                    raise StoreError(f"run {run_id} is a stage of pipeline {row[1]}, which is {pipeline[0]}: its "
                                     f"next stages use it; stop the pipeline first")
            for run_id in run_ids:
                for table in ("metrics", "samples", "checkpoints", "eval_items", "judgments"):
                    db.conn.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
                db.conn.execute("DELETE FROM pairwise WHERE a_run = ? OR b_run = ?", [run_id, run_id])
                db.conn.execute("DELETE FROM runs WHERE id = ?", [run_id])

    def vacuum_if_worthwhile(self, min_free_bytes: int = 32 * 1024 * 1024, min_share: float = 0.25) -> bool:
        """Give back the space deleted runs left (SQLite keeps free pages otherwise): when at least
        `min_free_bytes` and `min_share` of the file are free. Skipped, not waited for, while another
        connection is busy with the file."""
        with self._lock:
            free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
            pages = self.db.execute("PRAGMA page_count").fetchone()[0]
            size = self.db.execute("PRAGMA page_size").fetchone()[0]
            if free * size < min_free_bytes or free < min_share * max(pages, 1):
                return False
            self.db.conn.execute("PRAGMA busy_timeout = 100")
            try:
                self.db.conn.execute("VACUUM")
                # The whole file passed through the WAL: copied back and the WAL emptied now, unless a reader
                # is inside a read (then at a later checkpoint, down to WAL_LIMIT_BYTES)
                self.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.OperationalError:
                return False
            finally:
                self.db.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        return True

    def sample_steps(self, run_id: int) -> list[int]:
        with self._lock:
            rows = self.db.execute("SELECT DISTINCT step FROM samples WHERE run_id = ? ORDER BY step", [run_id])
            return [r[0] for r in rows.fetchall()]

    # -- metrics --------------------------------------------------------------------------------------
    def log_metrics(self, run_id: int, step: int, values: Mapping[str, Any], wall_time: float | None = None) -> int:
        """Append one step's numeric metrics in a single transaction; returns how many rows were written."""
        now = time.time() if wall_time is None else wall_time
        items = [(k, float(v)) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not items:
            return 0
        with self._write() as db:
            # Read inside the write lock, so any number of writers (or a resume) keep run_seq gapless.
            last = db.execute("SELECT MAX(run_seq) FROM metrics WHERE run_id = ?", [run_id]).fetchone()[0]
            next_seq = (last or 0) + 1
            rows = [
                (run_id, next_seq + i, step, name, value if math.isfinite(value) else None, now)
                for i, (name, value) in enumerate(items)
            ]
            db.conn.executemany(
                "INSERT INTO metrics (run_id, run_seq, step, name, value, wall_time) VALUES (?, ?, ?, ?, ?, ?)", rows
            )
            db.conn.execute("UPDATE runs SET step = MAX(COALESCE(step, 0), ?) WHERE id = ?", [step, run_id])
        return len(rows)

    def drop_history_after(self, run_id: int, step: int) -> int:
        """Forget a run's metrics, samples and checkpoint rows after `step`: on resume from that step's
        checkpoint they describe training that is about to be redone (a checkpoint row past it would name
        a step twice, with the old metrics). The tail goes, so run_seq stays gapless; `history_version`
        goes up so that a reader that already drew those rows knows to reload the run. Returns the number
        of metric rows dropped."""
        with self._write() as db:
            deleted = db.conn.execute("DELETE FROM metrics WHERE run_id = ? AND step > ?", [run_id, step]).rowcount
            db.conn.execute("DELETE FROM samples WHERE run_id = ? AND step > ?", [run_id, step])
            db.conn.execute("DELETE FROM checkpoints WHERE run_id = ? AND step > ?", [run_id, step])
            db.conn.execute(
                "UPDATE runs SET step = ?, history_version = history_version + ? WHERE id = ?",
                [step, int(deleted > 0), run_id],
            )
        return deleted

    def metrics_since(self, seq: int = 0, run_id: int | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Rows with seq > `seq`, oldest first: the console's incremental poll."""
        sql = "SELECT seq, run_id, run_seq, step, name, value, wall_time FROM metrics WHERE seq > ?"
        params: list[Any] = [seq]
        if run_id is not None:
            sql += " AND run_id = ?"
            params.append(run_id)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._lock:
            cursor = self.db.execute(sql, params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def metric_columns(self, run_id: int, up_to_seq: int, after_run_seq: int = 0, limit: int | None = None,
                       into: dict[str, tuple[array, array, array]] | None = None
                       ) -> tuple[dict[str, tuple[array, array, array]], int]:
        """A run's rows with seq <= `up_to_seq` and run_seq > `after_run_seq` (at most `limit` of them), in
        order, as packed columns per metric (steps, wall times, values; a null value is NaN), appended to
        `into`'s: a million rows cost 24 MB here, not the ~400 MB of one dict per row. Returns the columns and
        the last run_seq read (`after_run_seq` if none), from which a next slice goes on."""
        columns = {} if into is None else into
        last = after_run_seq
        with self._lock:
            cursor = self.db.conn.execute(
                # run_seq grows with seq within a run, and (run_id, run_seq) is indexed: ORDER BY seq sorted
                # every row of the run first (16 s for a run of 3 million rows)
                "SELECT name, step, wall_time, value, run_seq FROM metrics WHERE run_id = ? AND run_seq > ? "
                "AND seq <= ? ORDER BY run_seq LIMIT ?",
                [run_id, after_run_seq, up_to_seq, -1 if limit is None else limit])
            while rows := cursor.fetchmany(10_000):
                for name, step, wall, value, run_seq in rows:
                    cols = columns.get(name)
                    if cols is None:
                        cols = columns[name] = (array("d"), array("d"), array("d"))
                    cols[0].append(step)
                    cols[1].append(wall)
                    cols[2].append(math.nan if value is None else value)
                last = rows[-1][4]
        return columns, last

    def max_seq(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM metrics").fetchone()[0])

    def metric_extremes(self, names: Iterable[str], up_to_seq: int,
                        run_id: int | None = None) -> dict[int, dict[str, tuple[float | None, float | None]]]:
        """run id -> metric -> (min, max) over rows with seq <= `up_to_seq`, computed by SQLite (no row
        is loaded): the best-metric column of runs nobody is looking at."""
        names = list(names)
        if not names:
            return {}
        sql = (f"SELECT run_id, name, MIN(value), MAX(value) FROM metrics WHERE name IN "
               f"({', '.join('?' * len(names))}) AND seq <= ?")
        params: list[Any] = [*names, up_to_seq]
        if run_id is not None:
            sql, params = sql + " AND run_id = ?", [*params, run_id]
        out: dict[int, dict[str, tuple[float | None, float | None]]] = {}
        with self._lock:
            for rid, name, lo, hi in self.db.execute(sql + " GROUP BY run_id, name", params).fetchall():
                out.setdefault(rid, {})[name] = (lo, hi)
        return out

    def recent_metrics(self, run_id: int, up_to_seq: int, limit: int) -> list[dict[str, Any]]:
        """A run's newest `limit` rows with seq <= `up_to_seq`, oldest first."""
        with self._lock:
            cursor = self.db.execute(
                "SELECT seq, run_id, run_seq, step, name, value, wall_time FROM metrics WHERE run_id = ? "
                "AND seq <= ? ORDER BY run_seq DESC LIMIT ?", [run_id, up_to_seq, limit])  # indexed, as above
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in reversed(cursor.fetchall())]

    def last_metric_time(self, run_id: int) -> float | None:
        """When the run last logged a metric."""
        with self._lock:
            # The newest row's (along the run's index), not MAX over all of them: seconds for a long run
            row = self.db.execute("SELECT wall_time FROM metrics WHERE run_id = ? ORDER BY run_seq DESC LIMIT 1",
                                  [run_id]).fetchone()
            return row[0] if row else None

    def logged_times(self, run_id: int, since: float | None, limit: int) -> list[float]:
        """Up to `limit` of the newest distinct moments the run logged metrics at, from `since` on, oldest
        first. Read along the run's own sequence (its index): a week-long run's million rows are not
        sorted for a look at its last minutes."""
        with self._lock:
            rows = self.db.execute("SELECT wall_time FROM metrics WHERE run_id = ? ORDER BY run_seq DESC LIMIT ?",
                                   [run_id, 64 * limit]).fetchall()  # a logged step writes many metrics at once
        times = sorted({row[0] for row in rows if since is None or row[0] >= since})
        return times[-limit:]

    def last_value(self, run_id: int, name: str) -> float | None:
        with self._lock:
            row = self.db.execute(
                "SELECT value FROM metrics WHERE run_id = ? AND name = ? ORDER BY seq DESC LIMIT 1", [run_id, name]
            ).fetchone()
        return None if row is None else row[0]

    # -- checkpoints and samples ------------------------------------------------------------------------
    def add_checkpoint(
        self, run_id: int, step: int, path: str, metrics: Mapping[str, Any] | None = None, full_state: bool = False
    ) -> None:
        with self._write() as db:
            db["checkpoints"].insert(
                {
                    "run_id": run_id,
                    "step": step,
                    "path": path,
                    "metrics": json.dumps(dict(metrics or {})),
                    "full_state": int(full_state),
                    "created": time.time(),
                }
            )
            # Its step is trained, logged or not: a stop between two logging steps read "stopped 62/3000"
            # beside its checkpoint-63.
            db.conn.execute("UPDATE runs SET step = MAX(COALESCE(step, 0), ?) WHERE id = ?", [step, run_id])

    def prune_checkpoints(self, run_id: int) -> int:
        """Forget full-state checkpoints whose folder is gone (rotated out by save_total_limit)."""
        with self._write() as db:
            output_dir = db.execute("SELECT output_dir FROM runs WHERE id = ?", [run_id]).fetchone()
            rows = db.execute("SELECT id, path FROM checkpoints WHERE run_id = ? AND full_state = 1", [run_id])
            gone = [(row_id,) for row_id, path in rows.fetchall()
                    if not _checkpoint_folder(path, output_dir[0] if output_dir else None).exists()]
            db.conn.executemany("DELETE FROM checkpoints WHERE id = ?", gone)
        return len(gone)

    def checkpoints(self, run_id: int) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db["checkpoints"].rows_where("run_id = ?", [run_id], order_by="step, id"))

    def add_samples(self, run_id: int, step: int, samples: Iterable[tuple[str, str, float | None]]) -> None:
        now = time.time()
        with self._write() as db:
            db["samples"].insert_all(
                {"run_id": run_id, "step": step, "prompt": p, "response": r, "score": s, "created": now}
                for p, r, s in samples
            )

    def samples(self, run_id: int, step: int | None = None) -> list[dict[str, Any]]:
        where, params = ("run_id = ?", [run_id]) if step is None else ("run_id = ? AND step = ?", [run_id, step])
        with self._lock:
            return list(self.db["samples"].rows_where(where, params, order_by="step, id"))


class EvalStore:
    """The evaluation tables of runs.db (items and answers, verdicts, the judge cache, pairwise verdicts,
    chats), over a Store's connection."""

    def __init__(self, store: Store):
        self.store = store

    def _rows(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        with self.store._lock:
            cursor = self.store.db.execute(sql, params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    # -- items and answers ----------------------------------------------------------------------------------
    def add_items(self, run_id: int, items: Iterable[Mapping[str, Any]]) -> None:
        """Register the run's questions (once: a resumed run keeps what it has)."""
        rows = [(run_id, i["item_id"], i["category"], i["class"], i["question"], i["reference"]) for i in items]
        with self.store._write() as db:
            db.conn.executemany(
                "INSERT OR IGNORE INTO eval_items (run_id, item_id, category, class, question, reference) "
                "VALUES (?, ?, ?, ?, ?, ?)", rows)

    def set_answers(self, run_id: int, answers: Iterable[tuple[int, str, int, str]]) -> None:
        """(item id, answer, tokens, finished) for a batch, in one transaction."""
        now = time.time()
        with self.store._write() as db:
            db.conn.executemany(
                "UPDATE eval_items SET answer = ?, answer_tokens = ?, finished = ?, answered = ? "
                "WHERE run_id = ? AND item_id = ?",
                [(answer, tokens, finished, now, run_id, item_id) for item_id, answer, tokens, finished in answers])

    def copy_answers(self, source_run: int, run_id: int) -> int:
        """Reuse another run's answers (judging again without generating again)."""
        with self.store._write() as db:
            return db.conn.execute(
                "UPDATE eval_items AS t SET answer = s.answer, answer_tokens = s.answer_tokens, "
                "finished = s.finished, answered = s.answered FROM eval_items AS s WHERE t.run_id = ? "
                "AND s.run_id = ? AND s.item_id = t.item_id AND s.question = t.question AND s.answer IS NOT NULL "
                "AND t.answer IS NULL",
                [run_id, source_run]).rowcount

    def items(self, run_id: int) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM eval_items WHERE run_id = ? ORDER BY item_id", [run_id])

    # -- verdicts -------------------------------------------------------------------------------------------
    def set_judgment(self, run_id: int, item_id: int, judge: str, verdict: Any, cache_key: str | None = None,
                     judge_prompt: str | None = None) -> None:
        with self.store._write() as db:
            db.conn.execute(
                "INSERT OR REPLACE INTO judgments (run_id, item_id, judge, score, status, problem, reply, cache_key, "
                "prompt_tokens, completion_tokens, calls, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [run_id, item_id, judge, verdict.score, verdict.status, verdict.problem, verdict.reply, cache_key,
                 verdict.prompt_tokens, verdict.completion_tokens, verdict.calls, time.time()])
            if judge_prompt is not None:
                db.conn.execute("UPDATE eval_items SET judge_prompt = ? WHERE run_id = ? AND item_id = ?",
                                [judge_prompt, run_id, item_id])

    def judgments(self, run_id: int) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM judgments WHERE run_id = ? ORDER BY item_id", [run_id])

    def scored_items(self, run_id: int) -> list[dict[str, Any]]:
        """Each item of the run with its answer and verdict (None where not judged yet)."""
        return self._rows(
            "SELECT i.*, j.judge, j.score, j.status, j.problem, j.reply FROM eval_items AS i LEFT JOIN judgments AS j "
            "ON j.run_id = i.run_id AND j.item_id = i.item_id WHERE i.run_id = ? ORDER BY i.item_id", [run_id])

    # -- the judge cache ------------------------------------------------------------------------------------
    def get(self, key: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM judge_cache WHERE key = ?", [key])
        return rows[0] if rows else None

    def put(self, key: str, judge: str, request: Mapping[str, Any], reply: str,
            usage: tuple[int | None, int | None]) -> None:
        with self.store._write() as db:
            db.conn.execute(
                "INSERT OR REPLACE INTO judge_cache (key, judge, request, reply, prompt_tokens, completion_tokens, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [key, judge, json.dumps(dict(request), ensure_ascii=False), reply, usage[0], usage[1], time.time()])

    # -- pairwise -------------------------------------------------------------------------------------------
    def add_pairwise(self, a_run: int, b_run: int, item_id: int, first: str, judge: str, verdict: str | None,
                     reply: str, cache_key: str | None) -> None:
        with self.store._write() as db:
            db.conn.execute(
                "INSERT OR REPLACE INTO pairwise (a_run, b_run, item_id, first, judge, verdict, reply, cache_key, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [a_run, b_run, item_id, first, judge, verdict, reply, cache_key, time.time()])

    def pairwise(self, a_run: int, b_run: int, judge: str | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM pairwise WHERE a_run = ? AND b_run = ?", [a_run, b_run]
        if judge is not None:
            sql, params = sql + " AND judge = ?", [*params, judge]
        return self._rows(sql + " ORDER BY item_id, first", params)

    # -- chats ----------------------------------------------------------------------------------------------
    def add_chat(self, left: str, right: str, settings: Mapping[str, Any], transcript: Any, blind: bool = False,
                 vote: str | None = None, a_is: str | None = None, item_id: int | None = None,
                 category: str | None = None, replaces: int | None = None) -> int:
        """A chat exchange; `replaces`: the id of the row this one supersedes (the same exchange saved before
        its vote), rewritten in place so that an exchange is one row."""
        values = [left, right, json.dumps(dict(settings)), json.dumps(transcript, ensure_ascii=False), int(blind),
                  vote, a_is, item_id, category]
        with self.store._write() as db:
            if replaces is not None and db.conn.execute(
                    "UPDATE chats SET left_model = ?, right_model = ?, settings = ?, transcript = ?, blind = ?, "
                    "vote = ?, a_is = ?, item_id = ?, category = ? WHERE id = ?", [*values, replaces]).rowcount:
                return replaces
            cursor = db.conn.execute(
                "INSERT INTO chats (created, left_model, right_model, settings, transcript, blind, vote, a_is, "
                "item_id, category) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [time.time(), *values])
            return int(cursor.lastrowid)

    def chats(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM chats ORDER BY id", [])


class ResilientStore:
    """A run's view of runs.db in which a failed write (locked beyond the busy timeout, a full disk) never
    stops training: the write waits in an ordered backlog, retried before the next one, and the log says
    so. Rows keep their order (run_seq stays gapless); only if the backlog outgrows `max_backlog` are its
    oldest writes dropped, with a count in the log. Reads and everything else go straight to the store."""

    WRITES = ("log_metrics", "add_samples", "add_checkpoint", "prune_checkpoints", "update_run", "drop_history_after")

    def __init__(self, store: Store, max_backlog: int = 100_000):
        self.store = store
        self.backlog: deque[tuple[str, tuple, dict]] = deque()
        self.max_backlog = max_backlog
        self.dropped = 0
        self._warned_at = 0  # the backlog's size when the log last said so (each retry finds the same one)

    def __getattr__(self, name: str) -> Any:
        if name in self.WRITES:
            return lambda *args, **kwargs: self._hold(name, args, kwargs)
        return getattr(self.store, name)

    def _hold(self, name: str, args: tuple, kwargs: dict) -> Any:
        self.backlog.append((name, args, kwargs))
        if len(self.backlog) > self.max_backlog:
            self.backlog.popleft()
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.error("runs.db: %d writes dropped (the backlog is full); training goes on", self.dropped)
        return self.flush()

    def flush(self) -> Any:
        """Write the backlog in order; stop at the first failure (it stays for the next try)."""
        result = None
        while self.backlog:
            name, args, kwargs = self.backlog[0]
            try:
                result = getattr(self.store, name)(*args, **kwargs)
            except (StoreError, sqlite3.Error, OSError) as err:
                held = len(self.backlog)
                if held != self._warned_at and (held in (1, 10, 100) or held % 1000 == 0):
                    self._warned_at = held
                    log.warning("runs.db write failed (%s): %d writes held back, training goes on", err, held)
                return None
            self.backlog.popleft()
        if self._warned_at:
            self._warned_at = 0
            log.warning("runs.db takes writes again: the ones held back are written")
        return result

    def close(self, patience_s: float = 120.0) -> None:
        """Write what is held back before the run ends, trying for up to `patience_s`."""
        deadline = time.monotonic() + patience_s
        self.flush()
        while self.backlog and time.monotonic() < deadline:
            time.sleep(1.0)
            self.flush()
        if self.backlog:
            log.error("runs.db: %d writes could not be made before the run ended", len(self.backlog))
        self.store.close()


def no_database_here(path: str | os.PathLike) -> str:
    """What a command about runs says where it finds no runs.db."""
    return f"{path}: no runs database here (run from the folder that has runs.db, or give --db or set RLHF_DB)"


def default_db_path() -> Path:
    return Path(os.environ.get("RLHF_DB", "runs.db"))
