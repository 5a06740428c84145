"""The console's arithmetic and readers, without Textual: metric history, smoothing, downsampling,
log tail, config diff, store follower, GPU sampler (NVML spoken by a stand-in, as no driver exists here)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

from console.diff import config_diff, run_config
from console.follower import StoreFollower
from console.logtail import LogTail, clean_line, last_traceback
from console.messages import HistoryLoading, HistoryReset, MetricsPolled, RunsPolled
from console.series import History, Series, best_metric, downsample, eta_seconds, metric_groups
from engine.store import Store


def rows(run_id, start_seq, values, name="loss", start_step=1):
    return [{"seq": start_seq + i, "run_id": run_id, "step": start_step + i, "name": name, "value": v,
             "wall_time": 100.0 + i} for i, v in enumerate(values)]


def test_history_ingests_each_seq_once_and_groups_by_run():
    history = History()
    assert history.ingest(rows(1, 1, [3.0, 2.0])) == {1}
    assert history.ingest(rows(1, 2, [2.0, 1.0])) == {1}  # seq 2 again: only seq 3 is new
    assert history.ingest(rows(2, 4, [5.0])) == {2}
    assert list(history.runs[1].series["loss"].values.view) == [3.0, 2.0, 1.0]
    assert history.cursor == 4
    history.replace(1, 1, rows(1, 1, [3.0]))
    assert list(history.runs[1].series["loss"].values.view) == [3.0]


def test_debiased_ema_matches_hand_computation_and_extends_incrementally():
    series = Series()
    series.extend([1, 2], [0, 1], [1.0, 3.0])
    w = 0.5
    first = series.smoothed(w)
    # debiased EMA: a1 = 0.5*1 / 0.5 = 1; a2 = (0.25*1 + 0.5*3) / 0.75 = 2.333…
    assert first[0] == pytest.approx(1.0) and first[1] == pytest.approx(1.75 / 0.75)
    series.extend([3], [2], [math.nan])
    series.extend([4], [3], [5.0])
    incremental = series.smoothed(w).copy()
    fresh = Series()
    fresh.extend([1, 2, 3, 4], [0, 1, 2, 3], [1.0, 3.0, math.nan, 5.0])
    np.testing.assert_allclose(incremental, fresh.smoothed(w))
    assert math.isnan(incremental[2]) and not math.isnan(incremental[3])
    assert series.smoothed(0.9)[0] == pytest.approx(1.0)  # a new weight recomputes


def test_downsample_keeps_every_bucket_extreme_and_bounds_the_points():
    x = np.arange(100_000, dtype=float)
    y = np.sin(x / 50.0)
    y[31_337] = 40.0  # a spike a stride would drop
    y[77_777] = -40.0
    xs, ys = downsample(x, y, 200)
    assert len(xs) <= 2 * 200 + 200 and 40.0 in ys and -40.0 in ys
    assert np.all(np.diff(xs) > 0)  # still in x order
    small_x, small_y = downsample(x[:50], y[:50], 200)
    assert len(small_x) == 50


def test_groups_best_and_eta():
    assert metric_groups(["losses/value_loss", "kl_ctl_value", "losses/policy_loss"]) == {
        "kl_ctl_value": ["kl_ctl_value"], "losses": ["losses/policy_loss", "losses/value_loss"]}
    history = History()
    history.ingest(rows(1, 1, [0.5, 0.9, 0.7], name="eval_accuracy"))
    history.ingest(rows(1, 4, [3.0, 1.0], name="loss"))
    assert best_metric("rm", history.runs[1]) == ("eval_accuracy", 0.9)
    assert best_metric("sft", history.runs[1]) == ("loss", 1.0)
    # An evaluation's score mean is a running mean: its figure is the newest point (it was "-").
    history.ingest(rows(2, 100, [0.9, 0.4, float("nan"), 0.6, float("nan")], name="eval/score_mean"))
    assert best_metric("eval", history.runs[2]) == ("eval/score_mean", 0.6)
    # Once every category has a score, the score table's own headline: the macro average
    history.ingest(rows(2, 300, [0.55, 0.52], name="eval/score_macro"))
    assert best_metric("eval", history.runs[2]) == ("eval/score_macro", 0.52)
    # three points one second apart, steps 1..3: one step a second, 7 steps to go of 10
    assert eta_seconds(3, 10, history.runs[1]) == pytest.approx(7.0)
    assert eta_seconds(10, 10, history.runs[1]) is None
    # An evaluation: 10 answers a second for 100 steps, then one judgment every 2 s: the ETA is the judge's.
    evaluation = History()
    evaluation.ingest([{"seq": i, "run_id": 2, "step": i, "name": "eval/answered", "value": i, "wall_time": i / 10}
                       for i in range(1, 101)])
    evaluation.ingest([{"seq": 100 + i, "run_id": 2, "step": 100 + i, "name": "eval/judged", "value": i,
                        "wall_time": 10 + 2 * i} for i in range(1, 21)])
    assert eta_seconds(120, 200, evaluation.runs[2]) == pytest.approx(160.0)  # it said 8 s


def test_eta_and_time_leave_out_the_pause_between_a_stop_and_its_resume():
    from engine.run_facts import current_start, elapsed

    history = History()
    # 10 steps a second apart, stopped for an hour, resumed: 5 more steps a second apart
    walls = [100.0 + i for i in range(10)] + [3700.0 + i for i in range(5)]
    history.ingest([{"seq": i + 1, "run_id": 1, "step": i + 1, "name": "loss", "value": 1.0, "wall_time": w}
                    for i, w in enumerate(walls)])
    run = {"status": "running", "started": 99.5, "ended": None, "segments": json.dumps([[99.5, 109.5], [3699.5, None]])}
    assert current_start(run) == 3699.5
    assert eta_seconds(15, 100, history.runs[1], since=current_start(run)) == pytest.approx(85.0)  # one step a second
    assert eta_seconds(15, 100, history.runs[1]) > 85.0 * 50  # across the pause: the hour counted as training
    ended = dict(run, status="done", ended=3710.0, segments=json.dumps([[99.5, 109.5], [3699.5, 3710.0]]))
    assert elapsed(ended) == pytest.approx(10.0 + 10.5)
    killed = dict(ended, status="failed", segments=json.dumps([[99.5, None], [3699.5, 3710.0]]))  # cut by a kill
    assert elapsed(killed) == pytest.approx(10.5)
    assert elapsed({"status": "done", "started": 100.0, "ended": 160.0}) == 60.0  # a row without segments


def test_log_lines_fold_progress_bars_and_strip_colour(tmp_path):
    assert clean_line("\x1b[32mgreen\x1b[0m text") == "green text"
    assert clean_line(" 10%|█  |\r 50%|█████|\r100%|██████████|") == "100%|██████████|"
    log = tmp_path / "train.log"
    log.write_bytes(b"first line\nsecond \xe4\xb8")  # a UTF-8 character cut in two by the writer
    tail = LogTail(log)
    lines, pending = tail.read()
    assert lines == ["first line"] and pending.startswith("second")
    with open(log, "ab") as fh:
        fh.write(b"\xad\xe6\x96\x87 done\n 1/10\r 2/10")
    lines, pending = tail.read()
    assert lines == ["second 中文 done"] and pending == " 2/10"
    offset = tail.offset
    assert tail.read() == ([], " 2/10") and tail.offset == offset  # nothing new: nothing read
    log.write_text("replaced\n")  # a shorter file: start over
    assert tail.read()[0] == ["replaced"]
    with open(log, "a") as fh:  # a progress bar that never ends its line
        for i in range(10_000):
            fh.write(f"\r{i:>6}/10000 |{'#' * (i // 500)}|")
        fh.write("\r")
    assert tail.read() == ([], "  9999/10000 |###################|")
    assert len(tail._partial) < 100  # only the last redraw is kept, not all 10,000


def test_log_opens_at_its_end_and_finds_the_last_traceback(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("".join(f"line {i}\n" for i in range(100_000)))
    tail = LogTail(log, initial_bytes=1000)
    lines, _ = tail.read()
    assert tail.truncated_start and lines[-1] == "line 99999" and len(lines) < 200
    text = ["ok", "Traceback (most recent call last):", "  x", "E: one", "Traceback (most recent call last):", "E"]
    assert last_traceback(text) == 4 and last_traceback(["fine"]) is None
    # bad input says itself in one line, and accelerate's traceback about its child follows
    wrapper = ["Traceback (most recent call last):", '  File "accelerate/commands/launch.py"', "CalledProcessError"]
    assert last_traceback(["ok", "error: a.jsonl:3: not valid JSON", *wrapper]) == 1


def test_config_diff_lists_changed_keys_only():
    a = {"sft": {"train": {"lr": 0.001, "epochs": 1}, "data": [{"path": "a.jsonl"}]}, "seed": 0}
    b = {"sft": {"train": {"lr": 0.002, "epochs": 1}, "data": [{"path": "b.jsonl"}]}, "seed": 0, "extra": True}
    assert config_diff(a, b) == [("extra", "—", "true"), ("sft.data.0.path", "a.jsonl", "b.jsonl"),
                                 ("sft.train.lr", "0.001", "0.002")]
    assert config_diff(a, a) == []


def _write_steps(db, run_id, steps, per_step=5):
    with Store(db) as store:
        for step in range(1, steps + 1):
            store.log_metrics(run_id, step, {f"m{i}": float(step + i) for i in range(per_step)})


def test_an_sft_and_a_ppo_run_of_one_recipe_differ_by_stage_and_their_own_sections():
    recipe = json.dumps({"name": "tiny", "seed": 0, "sft": {"lr": 1e-3}, "rm": {"lr": 2e-3}, "ppo": {"lr": 1e-6},
                         "eval": {"limit": 8}})
    sft, ppo = ({"stage": stage, "config": recipe} for stage in ("sft", "ppo"))
    rows = config_diff(run_config(sft), run_config(ppo))
    assert ("stage", "sft", "ppo") in rows
    assert ("sft.lr", "0.001", "—") in rows and ("ppo.lr", "—", "1e-06") in rows
    assert not any(key.startswith("rm.") for key, _, _ in rows)  # the stage neither ran
    assert config_diff(run_config(sft), run_config(dict(sft))) == []
    # a pipeline's evaluation settings are no training run's: not in the diff of two SFT runs
    plain = {"stage": "sft", "config": json.dumps({"name": "tiny", "seed": 0, "sft": {"lr": 1e-3}})}
    assert config_diff(run_config(sft), run_config(plain)) == []
    # an evaluation run's settings are its whole config
    evals = [{"stage": "eval", "config": json.dumps({"checkpoint": c, "limit": 8})} for c in ("a", "b")]
    assert config_diff(run_config(evals[0]), run_config(evals[1])) == [("checkpoint", "a", "b")]


def test_two_followers_see_two_writers_rows_exactly_once(tmp_path):
    db = tmp_path / "runs.db"
    with Store(db) as store:
        ids = [store.create_run(stage="sft", name=f"r{i}", recipe="x.yaml", config="{}",
                                  output_root=str(tmp_path / "runs")) for i in range(2)]
    followers = [StoreFollower(db, batch=37) for _ in range(2)]  # a small batch: polls split the stream
    histories = [History(), History()]
    writers = [threading.Thread(target=_write_steps, args=(db, run_id, 200)) for run_id in ids]

    def drain(follower, history):
        messages, _ = follower.poll()
        for m in messages:
            if isinstance(m, MetricsPolled):
                history.ingest(m.rows)

    # The followers' first poll comes before the writers: a first poll that finds a long history loads only
    # its newest rows (a light history, by design), and this test is about the rows that arrive live.
    for f, h in zip(followers, histories):
        drain(f, h)
    for w in writers:
        w.start()

    while any(w.is_alive() for w in writers):
        for f, h in zip(followers, histories):
            drain(f, h)
    for w in writers:
        w.join()
    for f, h in zip(followers, histories):
        for _ in range(100):
            drain(f, h)
        for run_id in ids:
            run = h.runs[run_id]
            assert run.rows == 200 * 5
            assert list(run.series["m0"].steps.view) == list(range(1, 201))
        f.close()


def test_follower_reloads_a_run_whose_history_a_resume_rewrote(tmp_path):
    db = tmp_path / "runs.db"
    with Store(db) as store:
        run_id = store.create_run(stage="sft", name="r", recipe="x.yaml", config="{}",
                                  output_root=str(tmp_path / "runs"))
    _write_steps(db, run_id, 10, per_step=1)
    follower = StoreFollower(db)
    follower.followed = frozenset({run_id})
    messages, more = follower.poll()
    assert isinstance(messages[0], RunsPolled) and not more
    assert isinstance(messages[1], HistoryReset) and not messages[1].full  # seeded light, from SQL
    follower.requests.put(run_id)
    with Store(db) as store:
        store.drop_history_after(run_id, 6)
    messages, _ = follower.poll()
    reset = [m for m in messages if isinstance(m, HistoryReset)]
    assert len(reset) == 1 and reset[0].full and list(reset[0].columns["m0"][0]) == [1, 2, 3, 4, 5, 6]
    follower.close()


def test_a_long_history_loads_in_slices_while_every_other_run_moves_on(tmp_path):
    """A run of millions of rows was read in one call of seconds to tens of seconds inside a poll, and every
    other run's figures stood still meanwhile. Its history now comes a slice per poll, sent once whole, with
    what the run writes meanwhile neither lost nor doubled."""
    db = tmp_path / "runs.db"
    with Store(db) as store:
        long_run, live = (store.create_run(stage="sft", name=n, recipe="x.yaml", config="{}",
                                           output_root=str(tmp_path / "runs")) for n in ("long", "live"))
    _write_steps(db, long_run, 1000)  # 5,000 rows
    follower = StoreFollower(db, batch=400)
    history = History()

    progress = []

    def apply(messages) -> list:
        for m in messages:
            if isinstance(m, HistoryLoading):
                progress.append(m.rows)
            elif isinstance(m, MetricsPolled):
                history.ingest(m.rows)
            elif isinstance(m, HistoryReset) and (m.full or m.run_id not in history.followed):
                history.replace(m.run_id, m.history_version, m.rows, m.full, m.extremes, m.columns)
        return messages

    apply(follower.poll()[0])
    history.followed = {long_run}
    follower.followed = frozenset(history.followed)
    follower.requests.put(long_run)
    polls, live_seen, step = 0, [], 1000
    with Store(db) as store:
        while not history.runs[long_run].full:
            step += 1
            store.log_metrics(long_run, step, {f"m{i}": float(step + i) for i in range(5)})  # it trains on
            store.log_metrics(live, step - 1000, {"m0": float(step)})
            messages, more = follower.poll()
            apply(messages)
            polls += 1
            live_seen.append(len(history.runs[live].series["m0"]) if live in history.runs else 0)
            assert more or history.runs[long_run].full
            assert polls < 100
    assert polls >= 5000 // 400  # a slice a poll, each said (the chart's title shows it)
    assert progress == [400 * k for k in range(1, len(progress) + 1)] and len(progress) == polls - 1
    assert live_seen == sorted(live_seen) and live_seen[-2] > live_seen[0]  # the other run moved on meanwhile
    for _ in range(3):
        apply(follower.poll()[0])
    whole = history.runs[long_run].series["m0"]
    assert list(whole.steps.view) == list(range(1, step + 1))  # every step once, in order
    follower.close()


def test_the_console_holds_every_point_only_of_the_runs_it_shows(tmp_path):
    """Ten runs of 20,000 rows: at start no row is read one by one; each run keeps its newest points and
    its best-metric extremes; a run that is looked at gets its whole history, and lets it go after."""
    from console.series import LIGHT_POINTS, History, best_metric

    db = tmp_path / "runs.db"
    with Store(db) as store:
        ids = [store.create_run(stage="sft", name=f"r{i}", recipe="x.yaml", config="{}",
                                output_root=str(tmp_path / "runs")) for i in range(10)]
        for run_id in ids:
            for start in range(0, 20_000, 1000):
                for step in range(start + 1, start + 1001):
                    store.log_metrics(run_id, step, {"loss": 100.0 / step + run_id}, wall_time=float(step))
    follower = StoreFollower(db)
    history = History()
    messages, more = follower.poll()
    assert not more and not any(isinstance(m, MetricsPolled) for m in messages)
    for m in messages:
        if isinstance(m, HistoryReset):
            history.replace(m.run_id, m.history_version, m.rows, m.full, m.extremes)
    assert all(history.runs[i].rows <= 4 * LIGHT_POINTS for i in ids)
    assert best_metric("sft", history.runs[ids[3]]) == ("loss", pytest.approx(100.0 / 20_000 + ids[3]))
    history.followed = {ids[3]}
    follower.followed = frozenset(history.followed)
    follower.requests.put(ids[3])
    messages, _ = follower.poll()
    (whole,) = [m for m in messages if isinstance(m, HistoryReset)]
    history.replace(whole.run_id, whole.history_version, whole.rows, whole.full, whole.extremes, whole.columns)
    assert len(history.runs[ids[3]].series["loss"]) == 20_000
    history.runs[ids[3]].lighten()  # looked away
    assert len(history.runs[ids[3]].series["loss"]) <= 2 * LIGHT_POINTS
    assert best_metric("sft", history.runs[ids[3]])[1] == pytest.approx(100.0 / 20_000 + ids[3])
    follower.close()


class _FakeNvml(types.ModuleType):
    """Speaks pynvml's API for two GPUs, one of which reports no power reading (as MIG slices do)."""

    class NVMLError(Exception):
        pass

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, pid):
        super().__init__("pynvml")
        self.pid = pid

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=50 + h)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 60

    def nvmlDeviceGetPowerUsage(self, h):
        if h == 1:
            raise self.NVMLError("Not Supported")
        return 300_000

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [types.SimpleNamespace(pid=self.pid)] if h == 0 else []

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H100 80GB HBM3"


def test_gpu_sampler_reads_every_device_through_nvml(monkeypatch):
    from engine.gpu import GpuSampler, process_group

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(child.pid))
        readings = GpuSampler().read()
        assert [r.index for r in readings] == [0, 1]
        assert readings[0].power == 300.0 and readings[1].power is None and readings[1].utilization == 51.0
        assert readings[0].memory_used == 2**30 and readings[0].name == "NVIDIA H100 80GB HBM3"
        assert readings[0].pids == (child.pid,) and process_group(child.pid) == child.pid
    finally:
        child.kill()
        child.wait()


def test_gpu_sampler_without_a_driver_says_so(monkeypatch):
    from engine.gpu import GpuSampler, GpuUnavailable

    fake = _FakeNvml(0)

    def no_driver():
        raise fake.NVMLError("NVML Shared Library Not Found")

    fake.nvmlInit = no_driver
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with pytest.raises(GpuUnavailable, match="no NVIDIA driver: NVML Shared Library Not Found"):
        GpuSampler()


def test_console_imports_no_torch():
    # What the console imports, including the engine modules its workers use to launch, stop and read.
    code = ("import sys, console.app, console.screens.runs, console.screens.launch, console.screens.gpu, "
            "console.follower, engine.launch, engine.gpu, engine.store, engine.train\n"
            "bad = [m for m in ('torch', 'transformers', 'datasets', 'accelerate') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_pipelines_evaluation_is_not_named_for_its_pipeline_twice(tmp_path):
    """Its name carries "(pipeline N)" for the score table; in the run table its pipeline label says that,
    with where it is (`tiny ppo (pipeline 1) · pipeline 1 4/4` lost the 4/4 off the column's end)."""
    from console.widgets.run_table import cells

    config = json.dumps({"name": "tiny", **{stage: {"x": 1} for stage in ("sft", "rm", "ppo", "eval")}})
    with Store(tmp_path / "runs.db") as store:
        pipeline_id = store.create_pipeline(name="tiny", recipe="r.yaml", config=config, overrides=[],
                                            through="eval", launch={})
        run_id = store.create_run(stage="eval", name="tiny ppo (pipeline 1)", recipe="", config="{}",
                                  pipeline_id=pipeline_id, output_root=str(tmp_path / "runs"))
        run, pipeline = store.run(run_id), store.pipeline(pipeline_id)
    assert str(cells(run, History(), False, pipeline=pipeline)[2]) == "tiny ppo · pipeline 1 4/4"


def test_an_errors_summary_is_its_last_line_without_the_exceptions_module_path():
    from engine.run_facts import error_summary

    trace = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
             "engine.data.records.DataError: a.jsonl: no record\n")
    assert error_summary(trace) == "DataError: a.jsonl: no record"
    assert error_summary("step 40\nits launcher was killed by SIGKILL (the kernel's OOM killer, or kill -9)\n") == (
        "its launcher was killed by SIGKILL (the kernel's OOM killer, or kill -9)")
    assert error_summary("RuntimeError: CUDA out of memory. Tried to allocate") == (
        "RuntimeError: CUDA out of memory. Tried to allocate")


def test_a_running_run_that_logs_nothing_far_past_its_pace_reads_silent(tmp_path):
    """A hung rank or a stopped process keeps "running" and a ticking clock: the ETA cell says how long
    nothing has arrived, once that is far past the run's own pace, and only then."""
    import time

    from console.series import silent_seconds
    from console.widgets.run_table import cells

    now = time.time()
    history = History()
    history.ingest([{"seq": i, "run_id": 1, "step": i, "name": "loss", "value": 1.0, "wall_time": now - 1000 + 2 * i}
                    for i in range(1, 51)])  # a step every 2 s, the newest 900 s ago
    assert silent_seconds(history.runs[1], now) == pytest.approx(900.0)
    assert silent_seconds(history.runs[1], now - 850) is None  # 50 s quiet: under five minutes
    assert silent_seconds(history.runs[1], now, since=now - 10) is None  # resumed since: nothing logged yet
    slow = History()  # PPO at scale: a step every 2 minutes; 15 minutes between two is within its pace
    slow.ingest([{"seq": i, "run_id": 2, "step": i, "name": "loss", "value": 1.0,
                  "wall_time": now - 900 - 120 * (9 - i)} for i in range(1, 10)])
    assert silent_seconds(slow.runs[2], now) is None
    assert silent_seconds(slow.runs[2], now + 400) == pytest.approx(1300.0)

    with Store(tmp_path / "runs.db") as store:
        run_id = store.create_run(stage="sft", name="t", recipe="r.yaml", config="{}",
                                  output_root=str(tmp_path / "runs"))
        store.update_run(run_id, status="running", started=now - 1100, total_steps=500, step=50)
        run = store.run(run_id)
    history.runs[run_id] = history.runs.pop(1)
    assert str(cells(run, history, False)[5]) == "silent 15m00s"
    history.runs[run_id].series["loss"].extend([51.0], [now - 1.0], [1.0])
    assert not str(cells(run, history, False)[5]).startswith("silent")  # a point arrived: the ETA again


def test_resume_and_delete_of_an_active_run_say_what_the_table_shows():
    """r on a run whose stop is under way said "run 6 is running", while its row read "stopping"."""
    import os
    import socket

    from console.screens.runs import _still_active
    from engine.procs import process_start

    me = {"id": 6, "status": "running", "host": socket.gethostname(), "pid": os.getpid(), "pgid": None,
          "pgid_started": process_start(os.getpid()), "stop_requested": None}
    assert _still_active(me, "resume") == "run 6 is running: stop it first (x)"
    stopping = _still_active({**me, "stop_requested": 1.0}, "resume")
    assert stopping == "run 6 is stopping (writing its checkpoint): resume it once it has stopped"
    gone = {**me, "pid": 2 ** 22 + 1, "pgid_started": 1}  # no such process
    assert _still_active(gone, "delete").startswith("run 6's processes are gone")


def test_a_pipeline_stage_shows_its_pipeline_overrides_not_its_wiring():
    """A PPO stage's overrides cell read `model={"path": "/…/runs/1/final", "dtype": "auto", …` (the wiring
    every pipeline run has) and never the user's own --set, which the pipeline baked into its recipe."""
    from console.widgets.run_table import overrides_text
    from engine.config import load_recipe
    from engine.pipeline import wiring
    from engine.run_facts import PIPELINE_WIRING
    from tests.conftest import TINY

    recipe = load_recipe(str(TINY))
    wired = wiring("ppo", recipe, {"sft": "/r/1/final", "rm": "/r/2/final"}) + \
        wiring("rm", load_recipe(str(TINY), ["rm.model.path=@sft"]), {"sft": "/r/1/final"})
    assert {item.split("=", 1)[0] for item in wired} == set(PIPELINE_WIRING)
    pipeline = {"id": 3, "overrides": json.dumps(["ppo.kl_coef=0.05", "train.lr=1e-5"])}
    stage = {"id": 9, "stage": "ppo", "pipeline_id": 3, "overrides": json.dumps(wired + ["ppo.steps=7"])}
    assert overrides_text(stage, pipeline) == "kl_coef=0.05 train.lr=1e-5 steps=7"
    alone = {"id": 10, "stage": "sft", "pipeline_id": None, "overrides": json.dumps(["sft.train.lr=1e-4"])}
    assert overrides_text(alone) == "train.lr=1e-4"
    # Resumed twice with --allow-change: the step count in effect, not each one it had.
    alone["overrides"] = json.dumps(["sft.train.lr=1e-4", "train.max_steps=900", "sft.train.max_steps=1200"])
    assert overrides_text(alone) == "train.lr=1e-4 train.max_steps=1200"
    # The stage's model is not the recipe's: kept apart, and named as such.
    alone["overrides"] = json.dumps(["model.path=/base", "sft.model.path=/other"])
    assert overrides_text(alone) == "model.path=/base sft.model.path=/other"
    from engine.config import PPOStage, Recipe, RMStage, SFTStage
    from engine.run_facts import SHARED_FIELDS

    assert set(SHARED_FIELDS) == set(Recipe.model_fields) & (set(SFTStage.model_fields) | set(RMStage.model_fields)
                                                             | set(PPOStage.model_fields))


def test_a_quit_says_which_runs_it_leaves_going(tmp_path):
    """Runs outlive the console (their own processes); a newcomer who quit with one going was told nothing."""
    from console.app import still_going

    db = tmp_path / "runs.db"
    runs = {1: {"id": 1, "stage": "sft", "status": "done"}, 3: {"id": 3, "stage": "ppo", "status": "running"},
            2: {"id": 2, "stage": "rm", "status": "pending"}}
    assert still_going(runs, db, tmp_path / "elsewhere" / "runs.db") == (
        f"runs 2 (rm), 3 (ppo) still going, in their own processes: rlhf runs --db {db} shows them, rlhf console "
        f"--db {db} watches them again")
    assert still_going({3: runs[3]}, db, db) == ("run 3 (ppo) still going, in its own process: rlhf runs shows "
                                                 "them, rlhf console watches them again")
    assert still_going({1: runs[1]}, db, db) is None


def test_the_runs_that_use_a_runs_files_are_those_naming_a_path_in_its_folder():
    from engine.run_facts import runs_using

    one = {"id": 1, "output_dir": "/r/runs/1", "config": '{"output_root": "/r/runs"}'}
    runs = [one,
            {"id": 2, "config": '{"ppo": {"model": {"path": "/r/runs/1/final"}}}'},  # trained from its export
            {"id": 3, "config": '{"checkpoint": "/r/runs/1"}'},  # the folder itself
            {"id": 4, "config": '{"checkpoint": "/r/runs/10/final"}'},  # run 10's, not run 1's
            {"id": 5, "config": '{"output_root": "/r/runs"}'}, {"id": 6, "config": None}]
    assert runs_using(one, runs) == [2, 3]
    assert runs_using({"id": 7, "output_dir": None}, runs) == []


def test_what_tells_runs_of_one_recipe_apart_comes_first_in_their_overrides():
    """Five PPO runs from one SFT and RM: the wiring they all share filled the cell, and the setting each
    changed was cut off at its end."""
    from console.widgets.run_table import overrides_text, shared_overrides

    wiring = ["ppo.reward_fn=null", "ppo.reward_model=runs/2/final", "ppo.model.path=runs/1/final"]
    runs = [{"id": i, "stage": "ppo", "recipe": "/c/tiny.yaml", "pipeline_id": None,
             "overrides": json.dumps(wiring + own)}
            for i, own in ((3, []), (4, ["ppo.init_kl_coef=0.2"]), (5, ["ppo.lr=1e-3", "ppo.ppo_epochs=1"]))]
    runs.append({"id": 6, "stage": "ppo", "recipe": "/c/other.yaml", "pipeline_id": None,
                 "overrides": json.dumps(["ppo.lr=1e-3"])})  # alone of its recipe: nothing to share
    shared = shared_overrides(runs, {})
    assert shared == {("ppo", "/c/tiny.yaml"): frozenset({"reward_fn=null", "reward_model=runs/2/final",
                                                          "ppo.model.path=runs/1/final"})}
    key = ("ppo", "/c/tiny.yaml")
    assert overrides_text(runs[1], None, shared[key]) == \
        "init_kl_coef=0.2 reward_fn=null reward_model=runs/2/final ppo.model.path=runs/1/final"
    assert overrides_text(runs[2], None, shared[key]).startswith("lr=1e-3 ppo_epochs=1 reward_fn=null")
    assert overrides_text(runs[3], None, shared.get(("ppo", "/c/other.yaml"), frozenset())) == "lr=1e-3"


def test_a_curve_of_one_point_is_drawn_as_a_point():
    """An evaluation's metrics are one point each: a line through one point drew nothing, and its chart
    showed empty axes."""
    import asyncio

    from textual.app import App
    from textual.geometry import Region

    from console.widgets.chart import POINT, ChartLine, MetricChart

    class Charted(App):
        def compose(self):
            yield MetricChart()

    async def drawn(x: list[float], y: list[float]) -> str:
        app = Charted()
        async with app.run_test(size=(80, 24)) as pilot:
            chart = app.query_one(MetricChart)
            await pilot.pause()
            chart.draw("eval/score_mean", [ChartLine("run 7", "red", np.array(x), np.array(y), None, True)], "step")
            await pilot.pause()
            await pilot.pause()
            return "".join(strip.text for widget in chart.plot.walk_children()
                           for strip in widget.render_lines(Region(0, 0, widget.size.width, widget.size.height)))

    assert POINT in asyncio.run(drawn([20.0], [0.6215]))
    several = asyncio.run(drawn([1.0, 2.0, 3.0], [0.1, 0.5, 0.3]))
    assert POINT not in several and any("\u2800" < c <= "\u28ff" for c in several)  # a braille line
