import json
import multiprocessing as mp
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from engine.store import SCHEMA_VERSION, Store, StoreError


def new_run(store: Store, stage: str = "sft") -> int:
    return store.create_run(stage=stage, name="t", recipe="r.yaml", config="{}",
                            output_root=str(store.path.parent / "runs"))


def test_schema_is_created_once_and_wal_is_on(tmp_path):
    path = tmp_path / "runs.db"
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert {"runs", "metrics", "checkpoints", "samples"} <= set(store.db.table_names())
        run_id = new_run(store)
    with Store(path) as store:  # reopening migrates nothing and keeps the data
        assert store.schema_version == SCHEMA_VERSION
        assert store.run(run_id)["output_dir"] == str(path.parent.resolve() / "runs" / str(run_id))


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "runs.db"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this rlhf-console knows"):
        Store(path)


def test_metrics_run_seq_continues_and_non_numbers_are_skipped(tmp_path):
    with Store(tmp_path / "runs.db") as store:
        a, b = new_run(store), new_run(store, "rm")
        assert store.log_metrics(a, 1, {"loss": 1.0, "note": "text", "flag": True, "bad": float("nan")}) == 2
        store.log_metrics(b, 1, {"loss": 2.0})
        store.log_metrics(a, 2, {"loss": 0.5})
    with Store(tmp_path / "runs.db") as store:  # a new writer (a resumed run) continues the numbering
        store.log_metrics(a, 3, {"loss": 0.25})
        rows = store.metrics_since(0, run_id=a)
        assert [(r["run_seq"], r["step"], r["name"]) for r in rows] == [
            (1, 1, "loss"), (2, 1, "bad"), (3, 2, "loss"), (4, 3, "loss")]
        assert rows[1]["value"] is None  # NaN is kept as a row (the console shows the gap), stored as NULL
        assert store.run(a)["step"] == 3
        assert store.last_value(a, "loss") == 0.25
        first = rows[0]["seq"]
        assert [r["seq"] for r in store.metrics_since(first, limit=2)] == [first + 1, first + 2]


def test_dropping_a_tail_keeps_run_seq_gapless(tmp_path):
    with Store(tmp_path / "runs.db") as store:
        run_id = new_run(store)
        for step in range(1, 6):
            store.log_metrics(run_id, step, {"loss": 1.0, "lr": 0.1})
        assert store.drop_history_after(run_id, 3) == 4
        assert store.run(run_id)["step"] == 3
    with Store(tmp_path / "runs.db") as store:
        store.log_metrics(run_id, 4, {"loss": 0.5})
        rows = store.metrics_since(0, run_id=run_id)
        assert [(r["run_seq"], r["step"]) for r in rows][-3:] == [(5, 3), (6, 3), (7, 4)]


def test_unknown_status_is_refused(tmp_path):
    with Store(tmp_path / "runs.db") as store:
        run_id = new_run(store)
        with pytest.raises(StoreError):
            store.update_run(run_id, status="finished")


def test_checkpoints_and_samples(tmp_path):
    with Store(tmp_path / "runs.db") as store:
        run_id = new_run(store, "ppo")
        store.add_checkpoint(run_id, 10, "runs/1/checkpoint-10", {"loss": 1.0}, full_state=True)
        store.add_samples(run_id, 1, [("p1", "r1", 0.5), ("p2", "r2", None)])
        store.add_samples(run_id, 2, [("p3", "r3", 1.5)])
        assert [c["step"] for c in store.checkpoints(run_id)] == [10]
        assert [s["prompt"] for s in store.samples(run_id)] == ["p1", "p2", "p3"]
        assert [s["response"] for s in store.samples(run_id, step=1)] == ["r1", "r2"]


def _writer(path: str, run_id: int, steps: int) -> None:
    with Store(path) as store:
        for step in range(1, steps + 1):
            store.log_metrics(run_id, step, {"loss": 1.0 / step, "lr": 0.1, "acc": step / steps})


def test_polling_reader_sees_every_row_once_under_concurrent_writers(tmp_path):
    path = str(tmp_path / "runs.db")
    with Store(path) as store:
        runs = [new_run(store) for _ in range(3)]
    seen: list[dict] = []
    done = threading.Event()

    def poll() -> None:
        with Store(path) as reader:
            last = 0
            while True:
                finished = done.is_set()  # read before polling: one more poll after the writers end
                for row in reader.metrics_since(last):
                    seen.append(row)
                    last = row["seq"]
                if finished:
                    return

    reader = threading.Thread(target=poll)
    reader.start()
    ctx = mp.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(path, run_id, 300)) for run_id in runs]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
        assert w.exitcode == 0
    done.set()
    reader.join()

    seqs = [r["seq"] for r in seen]
    assert len(seqs) == len(set(seqs)) == 3 * 300 * 3
    assert seqs == sorted(seqs)
    for run_id in runs:
        assert sorted(r["run_seq"] for r in seen if r["run_id"] == run_id) == list(range(1, 901))


def test_runs_recorded_with_settings_now_refused_still_resume_as_they_trained(tmp_path):
    """A warm-up on a constant schedule (it had none) and a KL target for a coefficient of 0 (it stayed 0):
    refused since; the records say what those runs did, and resume."""
    from engine.config import Recipe, load_recipe
    from engine.store import MIGRATIONS, connect
    from tests.conftest import TINY

    recipe = load_recipe(TINY).model_dump()
    recipe["ppo"].update(warmup_steps=3, init_kl_coef=0.0)
    recipe["sft"]["train"]["warmup_ratio"] = 0.1
    kept = load_recipe(TINY, ["sft.train.lr_scheduler=cosine", "sft.train.warmup_ratio=0.1"]).model_dump()
    path = tmp_path / "runs.db"
    db = connect(path)
    for migrate in MIGRATIONS[:12]:
        migrate(db)
    db.execute("PRAGMA user_version = 12")
    for config in (recipe, kept):
        db["runs"].insert({"stage": "ppo", "name": "old", "status": "stopped", "created": 1.0,
                           "config": json.dumps(config)})
    db.conn.commit()
    db.close()
    with Store(path) as store:
        then, fine = (json.loads(store.run(i)["config"]) for i in (1, 2))
    assert then["ppo"]["warmup_steps"] == 0 and then["ppo"]["target_kl"] is None
    assert then["sft"]["train"]["warmup_ratio"] == 0.0 and then["ppo"]["init_kl_coef"] == 0.0
    Recipe.model_validate(then)  # loads as a resume loads it
    assert fine == kept  # a warm-up its schedule reads stays


def test_a_version_1_database_migrates_forward_with_its_runs(tmp_path):
    from engine.store import MIGRATIONS, connect

    path = tmp_path / "runs.db"
    db = connect(path)
    MIGRATIONS[0](db)  # what the first release created
    db.execute("PRAGMA user_version = 1")
    db["runs"].insert({"stage": "sft", "name": "old", "status": "done", "created": 1.0})
    db.conn.commit()
    db.close()
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION == 13
        run = store.run(1)
        assert run["name"] == "old" and run["launch"] is None and run["stop_requested"] is None
        assert run["note"] is None and run["data_fates"] is None and run["segments"] is None
        assert run["failure_code"] is None and run["changes"] is None
        store.update_run(1, launch='{"accelerate_config": "cpu.yaml"}', stop_requested=2.0)
        assert new_run(store) == 2


def test_delete_run_forgets_everything_it_logged(tmp_path):
    with Store(tmp_path / "runs.db") as store:
        keep, gone = new_run(store), new_run(store)
        for run_id in (keep, gone):
            store.update_run(run_id, status="done")
            store.log_metrics(run_id, 1, {"loss": 1.0})
            store.add_samples(run_id, 1, [("p", "r", 0.5)])
            store.add_checkpoint(run_id, 1, "runs/x")
        store.delete_runs([gone])
        assert [r["id"] for r in store.runs()] == [keep]
        assert {r["run_id"] for r in store.metrics_since(0)} == {keep}
        assert store.samples(gone) == [] and store.checkpoints(gone) == [] and len(store.samples(keep)) == 1
        with pytest.raises(StoreError, match=f"no run {gone}"):
            store.delete_runs([gone])
        assert new_run(store) == gone + 1  # a deleted run's id (and folder) is never handed out again
        store.update_run(keep, status="running")
        with pytest.raises(StoreError, match="is running: stop it before deleting it"):
            store.delete_runs([keep])


def test_a_stage_of_a_pipeline_resumed_since_the_check_is_not_deleted(tmp_path):
    with Store(tmp_path / "runs.db") as store:
        pipeline = store.create_pipeline(name="p", recipe="r.yaml", config="{}", overrides=[], through="ppo",
                                         launch={})
        stage = new_run(store)
        store.update_run(stage, status="done", pipeline_id=pipeline)
        store.update_pipeline(pipeline, status="running")  # resumed between the caller's look and the delete
        with pytest.raises(StoreError, match=f"stage of pipeline {pipeline}, which is running"):
            store.delete_runs([stage])
        assert store.run(stage)["status"] == "done"
        store.update_pipeline(pipeline, status="failed")
        store.delete_runs([stage])
        assert store.runs() == []


def test_runs_deleted_together_go_all_or_none(tmp_path):
    with Store(tmp_path / "runs.db") as store:
        first, resumed = new_run(store), new_run(store)
        for run_id in (first, resumed):
            store.update_run(run_id, status="done")
            store.log_metrics(run_id, 1, {"loss": 1.0})
        store.update_run(resumed, status="pending")  # resumed after `rlhf delete` checked both
        with pytest.raises(StoreError, match=f"run {resumed} is pending"):
            store.delete_runs([first, resumed])
        with pytest.raises(StoreError, match="no run 99"):
            store.delete_runs([first, 99])
        assert [r["id"] for r in store.runs()] == [first, resumed] and len(store.metrics_since(0)) == 2
        store.update_run(resumed, status="stopped")
        store.delete_runs([first, resumed])
        assert store.runs() == [] and store.metrics_since(0) == []


def test_only_one_resume_claims_an_ended_run(tmp_path):
    with Store(tmp_path / "runs.db") as store:
        run_id = new_run(store)
        store.update_run(run_id, status="stopped", launch="{}")  # launched: its exit is not recorded yet
        assert not store.claim_for_resume(run_id)
        store.update_run(run_id, exit_code=143, pgid=123, stop_requested=1.0)
        assert store.claim_for_resume(run_id)
        run = store.run(run_id)
        assert run["status"] == "pending" and run["pgid"] is None and run["stop_requested"] is None
        assert not store.claim_for_resume(run_id)  # a second resume of the same run loses
        assert run["pid"] == os.getpid()  # the claiming process, until it starts the run's own
        assert store.mark_stop_requested(run_id)[0] is None  # no process group yet…
        assert store.set_process(run_id, 456, 456)  # …so the supervisor learns of the stop itself


def test_opening_waits_for_a_writer_that_holds_the_lock(tmp_path):
    """The interleaving behind `database is locked` on open: a rollback-journal file with a writer holding
    its reserved lock. Switching to WAL then fails at once (SQLite skips the busy handler where waiting
    could deadlock); the open must wait for the writer instead of failing."""
    path = tmp_path / "runs.db"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("CREATE TABLE other (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO other VALUES (1)")
    outcome: list = []

    def open_store() -> None:
        try:
            with Store(path) as store:
                outcome.append(store.db.execute("PRAGMA journal_mode").fetchone()[0])
        except Exception as err:  # noqa: BLE001 - the test reports it
            outcome.append(err)

    opener = threading.Thread(target=open_store)
    opener.start()
    opener.join(timeout=1.0)  # an open that fails does so at once, while the lock is certainly held
    writer.execute("COMMIT")
    opener.join()
    writer.close()
    assert outcome == ["wal"]


def _open_at_once(barrier, paths: list[str], write: bool, errors) -> None:
    for path in paths:
        barrier.wait()
        try:
            with Store(path) as store:
                if write:
                    store.log_metrics(new_run(store), 1, {"loss": 1.0})
                else:
                    store.runs()
        except Exception as err:  # noqa: BLE001 - counted by the test
            errors.put(repr(err))


def test_sixteen_processes_open_a_fresh_database_at_the_same_moment(tmp_path):
    """16 processes open one new runs.db together, half of them writing at once, 30 rounds: no failed open."""
    ctx = mp.get_context("spawn")
    rounds, procs = 30, 16
    paths = [str(tmp_path / f"runs{i}.db") for i in range(rounds)]
    barrier, errors = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=_open_at_once, args=(barrier, paths, i % 2 == 0, errors)) for i in range(procs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == [] and all(w.exitcode == 0 for w in workers)
    for path in paths:
        with Store(path) as store:
            assert len(store.runs()) == procs // 2


def test_a_damaged_or_unwritable_database_is_one_clear_error(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "runs.db"
    bad.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(StoreError, match=r"cannot be opened as runs.db \(file is not a database\).*move it aside"):
        Store(bad)
    result = subprocess.run([sys.executable, "-m", "engine.cli", "runs", "--db", str(bad)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "move it aside" in result.stderr
    missing = subprocess.run([sys.executable, "-m", "engine.cli", "runs", "--db", str(tmp_path / "none.db")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no runs database here" in missing.stderr
    assert not (tmp_path / "none.db").exists()


def test_runs_db_is_for_its_owner_only(tmp_path):
    import stat

    with Store(tmp_path / "runs.db") as store:
        run_id = store.create_run(stage="sft", name="t", recipe="", config="{}", output_root=str(tmp_path / "runs"))
        assert stat.S_IMODE((tmp_path / "runs.db").stat().st_mode) == 0o600
        assert stat.S_IMODE(Path(store.run(run_id)["output_dir"]).stat().st_mode) & 0o077 == 0


def test_pruning_finds_checkpoints_recorded_relative_to_another_directory(tmp_path, monkeypatch):
    """Rows from before paths were absolute name folders relative to where the run started; a resume from
    another directory must not take them for rotated out."""
    with Store(tmp_path / "runs.db") as store:
        run_id = store.create_run(stage="sft", name="t", recipe="", config="{}", output_root=str(tmp_path / "runs"))
        folder = Path(store.run(run_id)["output_dir"])
        (folder / "checkpoint-3").mkdir()
        store.add_checkpoint(run_id, 3, f"runs/{run_id}/checkpoint-3", full_state=True)  # kept: it is there
        store.add_checkpoint(run_id, 4, f"runs/{run_id}/checkpoint-4", full_state=True)  # rotated out
        store.add_checkpoint(run_id, 5, str(folder / "checkpoint-5"), full_state=True)  # rotated out
        monkeypatch.chdir(tmp_path.parent)  # not where the run started
        assert store.prune_checkpoints(run_id) == 2
        assert [c["step"] for c in store.checkpoints(run_id)] == [3]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to be another user for a moment")
def test_a_runs_db_this_user_may_not_read_is_said_to_be_so_not_damaged():
    """A teammate's runs.db (mode 600): "damaged, move it aside" would have someone lose the team's runs."""
    from tests.helpers import as_user, shared_folder

    with shared_folder() as shared:
        db = shared / "runs.db"
        with Store(db) as store:
            store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}",
                             output_root=str(shared / "runs"))
        with as_user(65534), pytest.raises(StoreError) as raised:
            Store(db)
        assert str(raised.value) == (
            f"{db}: permission denied: runs.db is root's (mode 600); to share runs.db, its owner can give your "
            "group read and write access to it, its -wal and -shm files and its folder")


def test_version_9_records_of_lora_runs_say_the_head_they_did_not_train(tmp_path):
    """Before version 10 a LoRA run recorded train_head true (a head LoRA never trained); that pair is now
    refused, so the records say what the run did and still load for a resume."""
    import json

    from engine.config import load_recipe
    from engine.store import MIGRATIONS, connect
    from tests.conftest import TINY

    path = tmp_path / "runs.db"
    db = connect(path)
    for migration in MIGRATIONS[:9]:
        migration(db)
    db.execute("PRAGMA user_version = 9")
    lora = load_recipe(TINY, ["ppo.lora={r: 4}"]).model_dump()
    lora["ppo"]["train_head"] = True
    full = load_recipe(TINY).model_dump()
    full["ppo"]["train_head"] = True
    for config in (lora, full):
        db["runs"].insert({"stage": "ppo", "name": "old", "status": "stopped", "created": 1.0,
                           "config": json.dumps(config)})
    db["pipelines"].insert({"name": "old", "status": "stopped", "created": 1.0, "config": json.dumps(lora)})
    db.conn.commit()
    db.close()
    with Store(path) as store:
        migrated, untouched = (json.loads(store.run(i)["config"]) for i in (1, 2))
        assert migrated["ppo"]["train_head"] is None and migrated["ppo"]["lora"]["r"] == 4
        assert untouched == full
        assert json.loads(store.db["pipelines"].get(1)["config"])["ppo"]["train_head"] is None
    recorded = tmp_path / "recorded.yaml"
    recorded.write_text(json.dumps(migrated), encoding="utf-8")
    assert load_recipe(recorded, [], "ppo").ppo.trains_head is False


def test_the_readme_names_every_column_of_runs_db(tmp_path):
    """README's runs.db table is what a user reads before querying the file: every table and column of a
    new runs.db is named there (it listed a `tokens` column that never existed and no `pipelines`)."""
    import re

    from tests.conftest import REPO

    rows = {}
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        found = re.match(r"\| `(\w+)` \| (.*) \|$", line)
        if found:
            rows[found[1]] = found[2]
    with Store(tmp_path / "runs.db") as store:
        tables = {t: [c.name for c in store.db[t].columns] for t in store.db.table_names() if t != "sqlite_sequence"}
    missing = [f"{t}.{c}" for t, columns in tables.items() for c in columns
               if t not in rows or not re.search(rf"(?<![\w`]){c}(?!\w)", rows[t].replace("/", ", "))]
    assert missing == []


def test_a_checkpoint_counts_its_step_as_trained(tmp_path):
    """A stop between two logging steps saved checkpoint-63 while the row still read step 62."""
    with Store(tmp_path / "runs.db") as store:
        run_id = store.create_run(stage="sft", name="t", recipe="", config="{}", output_root=str(tmp_path / "runs"))
        store.log_metrics(run_id, 62, {"loss": 1.0})
        store.add_checkpoint(run_id, 63, str(tmp_path / "runs" / str(run_id) / "checkpoint-63"), full_state=True)
        assert store.run(run_id)["step"] == 63
        store.add_checkpoint(run_id, 40, "older")  # never back
        assert store.run(run_id)["step"] == 63


def test_a_long_runs_history_is_read_along_its_index_never_sorted(tmp_path):
    """The console's first look at a run of millions of rows took 13-22 s: its queries sorted the run's
    whole history by seq. Each query it makes for one run is planned along (run_id, run_seq)."""
    with Store(tmp_path / "runs.db") as store:
        runs = [new_run(store), new_run(store)]
        for step in range(1, 40):
            for run_id in runs:
                store.log_metrics(run_id, step, {"loss": 1.0 / step, "lr": 1e-3})
        seen: list[str] = []
        store.db.conn.set_trace_callback(seen.append)
        top = store.max_seq()
        recent = store.recent_metrics(runs[0], top, 10)
        columns, _ = store.metric_columns(runs[0], top)
        last = store.last_metric_time(runs[0])
        store.db.conn.set_trace_callback(None)
        assert [r["step"] for r in recent] == [35, 35, 36, 36, 37, 37, 38, 38, 39, 39]
        assert list(columns["loss"][0]) == list(range(1, 40)) and last is not None
        reads = [sql for sql in seen if sql.lstrip().upper().startswith("SELECT") and "FROM metrics" in sql]
        assert len(reads) >= 3
        for sql in reads:
            plan = " ".join(str(row[-1]) for row in store.db.conn.execute("EXPLAIN QUERY PLAN " + sql))
            assert "TEMP B-TREE" not in plan and "SCAN metrics" not in plan, (sql, plan)



def test_a_write_held_back_is_said_once_not_at_every_retry(tmp_path, caplog):
    """A full disk: the run's one held write was retried every second and the log said so 122 times."""
    import logging

    from engine.store import ResilientStore

    with Store(tmp_path / "runs.db") as store:
        run_id = new_run(store)
        resilient = ResilientStore(store)
        store.db.execute("PRAGMA query_only = 1")  # every write fails, as on a full disk
        with caplog.at_level(logging.WARNING, logger="engine.store"):
            resilient.log_metrics(run_id, 1, {"loss": 1.0})
            for _ in range(5):
                resilient.flush()
            held = [r.getMessage() for r in caplog.records]
            assert len(held) == 1 and "1 writes held back" in held[0]
            store.db.execute("PRAGMA query_only = 0")
            resilient.log_metrics(run_id, 2, {"loss": 0.5})
        assert [r["step"] for r in store.metrics_since(0)] == [1, 2]  # in order, none lost
        assert "takes writes again" in caplog.records[-1].getMessage() and len(caplog.records) == 2
