"""The console's costs, each against a baseline measured in the same run.

    python benchmarks/console.py [--follow-seconds 20]

1. Start to first frame: `python -m engine.cli console` in a fresh process until its first screen is
   composed and painted (headless), against a bare Textual app. Target <= 0.5 s.
2. CPU while following 10 live runs: the console (headless, one run selected and 9 overlaid) while 10
   writer processes log, at a typical rate (a step a second, 20 metrics) and a busy one (10 steps a
   second, 10 metrics); its CPU time over the window as a share of one core, against the same console
   with an idle runs.db. Target <= 5 %.
3. Redraw of a chart with 100,000 points (downsample + plot + canvas render), against 1,000 points and
   against handing all 100,000 points to the plot library undownsampled. Target <= 30 ms.
4. Opening a runs.db of 10 runs x 100,000 metric rows: CPU seconds until every run's row is filled, and
   the console's peak memory, against an empty runs.db. Only the selected run's whole history is loaded.
5. Key to frame while 10 runs log (a step a second, 20 metrics each): arrow keys move the highlighted run
   (info line, chart and log follow it); from the key's delivery until the frame after the selection
   changed, p50 and p95, against the same keys with no run logging.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Both apps report the same way: when the first frame that shows the app's own screen (the console's run
# table, the bare app's text) has been written to the terminal, `painted` prints the time and exits. (Until
# 2026-11-27 the report came two refreshes after mount, which also counted what the console defers until
# after its first frame, the chart's numpy and plotting imports: ~0.25 s.)
FIRST_FRAME = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})

    def painted():
        print(repr(time.time()), flush=True)
        # Leave once what the first frame deferred has mounted: exiting inside a frame breaks its mounts.
        app.call_after_refresh(lambda: app.call_after_refresh(app.exit))

    def report_after_paint(app_class):
        mount, display = app_class.on_mount, app_class._display

        def on_mount(self):
            global app
            app = self
            mount(self)

        def _display(self, screen, renderable):
            display(self, screen, renderable)
            if renderable is not None and screen is self.screen and screen.id != "_default" \\
                    and not getattr(self, "reported", False):
                self.reported = True
                painted()

        app_class.on_mount = on_mount
        app_class._display = _display

""")

# The real entry point, `rlhf console --db DB`, painting headless.
CONSOLE_APP = """
import engine.cli
from textual.app import App
from console.app import RlhfConsole

report_after_paint(RlhfConsole)
RlhfConsole.run = lambda self, **kwargs: App.run(self, headless=True, size=(80, 24))
engine.cli.main(["console", "--db", {db!r}])
"""

BARE_APP = """
from textual.app import App
from textual.widgets import Static

from textual.screen import Screen

class Hello(Screen):
    def compose(self):
        yield Static("hello")

class Bare(App):
    def on_mount(self):
        self.push_screen(Hello())

report_after_paint(Bare)
Bare().run(headless=True, size=(80, 24))
"""


def first_frame_s(app_code: str, repeats: int = 5) -> float:
    """Median wall time from starting the interpreter to the first painted frame."""
    script = FIRST_FRAME.format(repo=str(REPO)) + app_code
    times = []
    for _ in range(repeats):
        start = time.time()
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        times.append(float(out.stdout.strip().splitlines()[-1]) - start)
    return statistics.median(times)


def _writer(db: str, run_id: int, seconds: float, steps_per_s: float, metrics: int) -> None:
    from engine.store import Store

    with Store(db) as store:
        step, end = 0, time.time() + seconds
        while time.time() < end:
            step += 1
            store.log_metrics(run_id, step, {f"metric_{i}": step * 0.01 + i for i in range(metrics)})
            time.sleep(1.0 / steps_per_s)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


FOLLOW = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from console.app import RlhfConsole
    class Following(RlhfConsole):
        def on_runs_polled(self, message):
            super().on_runs_polled(message)
            home = self.home
            if home is not None and not home.marked and len(self.runs) > 1:
                home.marked = sorted(self.runs)[1:]  # 9 overlaid beside the selected one
    Following({db!r}, gpu_sampler=None).run(headless=True, size=(160, 48))
""")


def follow_cpu(db: str, runs: int, seconds: float, steps_per_s: float = 1.0, metrics: int = 20) -> tuple[float, int]:
    """CPU share of one core the console uses over `seconds`, and the rows written meanwhile."""
    from engine.store import Store

    with Store(db) as store:
        ids = [store.create_run(stage="ppo", name=f"live{i}", recipe="x.yaml", config="{}",
                                output_root=str(Path(db).parent / "runs")) for i in range(runs)]
        for run_id in ids:
            store.update_run(run_id, status="running", total_steps=10_000)
    proc = subprocess.Popen([sys.executable, "-c", FOLLOW.format(repo=str(REPO), db=db)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(3.0)  # start-up and first load are measured by the first benchmark
    ctx = mp.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(db, run_id, seconds + 2, steps_per_s, metrics)) for run_id in ids]
    for w in writers:
        w.start()
    time.sleep(1.0)
    cpu0, t0 = _cpu_seconds(proc.pid), time.monotonic()
    time.sleep(seconds)
    cpu1, t1 = _cpu_seconds(proc.pid), time.monotonic()
    for w in writers:
        w.join()
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    with Store(db) as store:
        rows = len(store.metrics_since(0))
    return (cpu1 - cpu0) / (t1 - t0), rows


OPEN = textwrap.dedent("""
    import resource, sys, time
    sys.path.insert(0, {repo!r})
    from console.app import RlhfConsole
    class Opening(RlhfConsole):
        def on_history_reset(self, message):
            super().on_history_reset(message)
            self.check()
        def on_runs_polled(self, message):
            super().on_runs_polled(message)
            self.check()
        def on_metrics_polled(self, message):
            super().on_metrics_polled(message)
            self.check()
        def check(self):
            home = self.home
            selected = getattr(home, "selected", None)
            shown = self.history.runs.get(selected) if selected is not None else None
            ready = self.loaded and all(r in self.history.runs for r in self.runs) and (
                not self.runs or shown is not None and len(shown.series.get("loss", ())) >= self.runs[selected]["step"])
            if ready and not getattr(self, "reported", False):
                self.reported = True
                usage = resource.getrusage(resource.RUSAGE_SELF)
                print(usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, flush=True)
                self.exit()
    Opening({db!r}, gpu_sampler=None).run(headless=True, size=(120, 36))
""")


def open_cost(db: str, repo: Path = REPO) -> tuple[float, float]:
    """(CPU seconds, peak RSS MiB) of a console (of `repo`) opening `db` until every run is shown."""
    out = subprocess.run([sys.executable, "-c", OPEN.format(repo=str(repo), db=db)], capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(out.stderr[-2000:])
    cpu, rss = out.stdout.split()
    return float(cpu), float(rss)


def big_db(db: str, runs: int = 10, rows_per_run: int = 100_000, metrics: int = 10) -> None:
    from engine.store import Store

    with Store(db) as store:
        for i in range(runs):
            run_id = store.create_run(stage="sft", name=f"big{i}", recipe="x.yaml", config="{}",
                                      output_root=str(Path(db).parent / "runs"))
            store.update_run(run_id, status="done", total_steps=rows_per_run // metrics)
            for step in range(1, rows_per_run // metrics + 1):
                store.log_metrics(run_id, step, {("loss" if k == 0 else f"m{k}"): 1.0 / step + k
                                                 for k in range(metrics)}, wall_time=float(step))


def redraw_ms(points: int, downsampled: bool = True, repeats: int = 10) -> float:
    import numpy as np

    from console.app import RlhfConsole
    from console.series import History
    from console.widgets.chart import ChartLine, MetricChart

    result: list[float] = []

    async def run() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            app = RlhfConsole(Path(tmp) / "runs.db", gpu_sampler=None)
            async with app.run_test(size=(160, 48)) as pilot:
                await pilot.pause(0.5)
                chart = app.home.query_one(MetricChart)
                history = History()
                history.ingest([{"seq": i + 1, "run_id": 1, "step": i + 1, "name": "loss",
                                 "value": float(np.sin(i / 500) + np.random.rand()), "wall_time": i}
                                for i in range(points)])
                series = history.runs[1].series["loss"]
                series.smoothed(0.9)
                plot = chart.plot
                for _ in range(repeats + 1):
                    t0 = time.perf_counter()
                    line = ChartLine("run 1", "#4fc1ff", series.steps.view, series.values.view,
                                     series.smoothed(0.9))
                    if downsampled:
                        chart.draw("loss", [line], "step")
                    else:
                        plot.clear()
                        plot.plot(line.x, line.raw)
                        plot.plot(line.x, line.smooth)
                    plot.render()  # the canvas work a frame does
                    result.append((time.perf_counter() - t0) * 1000)

    asyncio.run(run())
    return statistics.median(result[1:])


def key_latency(db: str, runs: int, logging: bool, keys: int = 40) -> tuple[float, float]:
    """(p50, p95) ms from a key's delivery (as the terminal driver delivers it) to the frame after the
    highlighted run changed; `logging`: 10 writer processes log meanwhile."""
    from textual import events

    from console.app import RlhfConsole
    from engine.store import Store

    with Store(db) as store:
        ids = [store.create_run(stage="sft", name=f"live{i}", recipe="x.yaml", config="{}",
                                output_root=str(Path(db).parent / "runs")) for i in range(runs)]
        for run_id in ids:
            store.update_run(run_id, status="running", total_steps=10_000)
    ctx = mp.get_context("spawn")
    writers = [ctx.Process(target=_writer, args=(db, run_id, 120, 1.0, 20)) for run_id in ids] if logging else []
    for w in writers:
        w.start()

    async def measure() -> list[float]:
        app = RlhfConsole(db, gpu_sampler=None)
        latencies = []
        async with app.run_test(size=(160, 48)) as pilot:
            while not (app.loaded and len(app.runs) == runs and app.home is not None):
                await pilot.pause(0.05)
            await pilot.pause(2.0)  # the first load settles
            home = app.home
            for k in range(keys):
                key = "down" if (k // 5) % 2 == 0 else "up"  # back and forth over five rows
                before = home.selected
                frame = asyncio.get_running_loop().create_future()
                start = time.perf_counter()
                app.post_message(events.Key(key, None))
                while home.selected == before:
                    await asyncio.sleep(0.0005)
                app.call_after_refresh(lambda: frame.done() or frame.set_result(time.perf_counter()))
                latencies.append(await frame - start)
                await asyncio.sleep(0.2)  # a person's pace, not a key repeat
        return latencies

    try:
        latencies = asyncio.run(measure())
    finally:
        for w in writers:
            w.terminate()
            w.join()
    return 1000 * statistics.median(latencies), 1000 * statistics.quantiles(latencies, n=20)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--follow-seconds", type=float, default=20.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "runs.db")
        from engine.store import Store

        Store(db).close()
        console_first = first_frame_s(CONSOLE_APP.format(db=db))
        bare_first = first_frame_s(BARE_APP)

    with tempfile.TemporaryDirectory() as tmp:
        idle_db = str(Path(tmp) / "idle.db")
        idle_cpu, _ = follow_cpu(idle_db, 0, args.follow_seconds)
    with tempfile.TemporaryDirectory() as tmp:
        # A PPO run logs ~25 metrics a step, a step every few seconds; SFT logs every N steps.
        live_cpu, rows = follow_cpu(str(Path(tmp) / "live.db"), 10, args.follow_seconds, 1.0, 20)
    with tempfile.TemporaryDirectory() as tmp:
        busy_cpu, busy_rows = follow_cpu(str(Path(tmp) / "busy.db"), 10, args.follow_seconds, 10.0, 10)

    with tempfile.TemporaryDirectory() as tmp:
        empty_db, full_db = str(Path(tmp) / "empty.db"), str(Path(tmp) / "full.db")
        Store(empty_db).close()
        big_db(full_db)
        empty_cpu, empty_rss = open_cost(empty_db)
        full_cpu, full_rss = open_cost(full_db)

    with tempfile.TemporaryDirectory() as tmp:
        key_live = key_latency(str(Path(tmp) / "keys.db"), 10, True)
    with tempfile.TemporaryDirectory() as tmp:
        key_idle = key_latency(str(Path(tmp) / "keys.db"), 10, False)

    big = redraw_ms(100_000)
    small = redraw_ms(1_000)
    raw = redraw_ms(100_000, downsampled=False, repeats=3)

    print(f"Console benchmarks ({os.cpu_count()} cores, Python {sys.version.split()[0]})\n")
    print("| measure | console | baseline | ratio | target |")
    print("|---|---:|---:|---:|---|")
    print(f"| start to first frame | {console_first:.3f} s | {bare_first:.3f} s (bare Textual app) | "
          f"{console_first / bare_first:.2f}x | <= 0.5 s |")
    for label, cpu, n in (("1 step/s x 20 metrics each", live_cpu, rows), ("10 steps/s x 10 metrics each", busy_cpu,
                                                                           busy_rows)):
        print(f"| CPU following 10 live runs, {label} ({n:,} rows in {args.follow_seconds:.0f} s) | "
              f"{100 * cpu:.1f} % of a core | {100 * idle_cpu:.1f} % (no runs) | "
              f"{cpu / max(idle_cpu, 1e-3):.0f}x | <= 5 % |")
    print(f"| chart redraw, 100,000 points | {big:.1f} ms | {small:.1f} ms (1,000 points) | {big / small:.2f}x "
          f"| <= 30 ms |")
    print(f"| chart redraw, 100,000 points undownsampled | {raw:.1f} ms | {big:.1f} ms (downsampled) | "
          f"{raw / big:.1f}x | - |")
    print(f"| opening 1,000,000 metric rows (10 runs): CPU until every run is shown | {full_cpu:.2f} s | "
          f"{empty_cpu:.2f} s (empty runs.db) | {full_cpu / empty_cpu:.2f}x | - |")
    print(f"| opening 1,000,000 metric rows (10 runs): peak memory | {full_rss:.0f} MiB | {empty_rss:.0f} MiB "
          f"(empty runs.db) | +{full_rss - empty_rss:.0f} MiB | - |")
    for label, live, idle in (("p50", key_live[0], key_idle[0]), ("p95", key_live[1], key_idle[1])):
        print(f"| key to frame while 10 runs log, {label} | {live:.1f} ms | {idle:.1f} ms (no run logging) | "
              f"{live / idle:.2f}x | - |")


if __name__ == "__main__":
    main()
