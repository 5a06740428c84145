"""runs.db write throughput with a polling reader: 1 and 3 concurrent writer processes.

Each writer logs STEPS steps of METRICS metrics (one transaction per step, as the trainer callback
does) for its own run, while a console-style reader polls `seq > last` every POLL_S seconds. The
reader must end with every row exactly once. Baseline, measured in the same run: one writer that
commits every row on its own (what a naive sink would do).

    python benchmarks/store.py [--steps 2000] [--metrics 10]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.store import Store  # noqa: E402

POLL_S = 0.1


def _writer(path: str, run_id: int, steps: int, metrics: int, per_row: bool, start: mp.Event) -> None:
    names = [f"m{i}" for i in range(metrics)]
    with Store(path) as store:
        start.wait()
        for step in range(1, steps + 1):
            if per_row:
                for name in names:
                    store.log_metrics(run_id, step, {name: step * 0.5})
            else:
                store.log_metrics(run_id, step, {name: step * 0.5 for name in names})


def measure(writers: int, steps: int, metrics: int, per_row: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "runs.db")
        with Store(path) as store:
            # Their folders in the temporary one: under ./runs they took run ids from the user's runs.db
            runs = [store.create_run(stage="sft", name="bench", recipe="-", config="{}",
                                     output_root=str(Path(tmp) / "runs")) for _ in range(writers)]
        ctx = mp.get_context("spawn")
        start = ctx.Event()
        procs = [ctx.Process(target=_writer, args=(path, r, steps, metrics, per_row, start)) for r in runs]
        for p in procs:
            p.start()
        seen: list[int] = []
        done = threading.Event()

        def poll() -> None:
            with Store(path) as reader:
                last = 0
                while True:
                    finished = done.is_set()
                    rows = reader.metrics_since(last)
                    seen.extend(r["seq"] for r in rows)
                    if rows:
                        last = rows[-1]["seq"]
                    if finished:
                        return
                    time.sleep(POLL_S)

        reader = threading.Thread(target=poll)
        time.sleep(1.0)  # let the spawned writers import and open the store
        reader.start()
        t0 = time.perf_counter()
        start.set()
        for p in procs:
            p.join()
        elapsed = time.perf_counter() - t0
        done.set()
        reader.join()
        with Store(path) as store:
            total = store.db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
    expected = writers * steps * metrics
    return {
        "rows": expected,
        "seconds": elapsed,
        "rows_per_s": expected / elapsed,
        "stored": total,
        "lost": expected - len(set(seen)),
        "duplicated": len(seen) - len(set(seen)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--metrics", type=int, default=10)
    args = parser.parse_args()

    cases = [
        ("baseline: 1 writer, a commit per row", 1, True),
        ("1 writer, a commit per step", 1, False),
        ("3 writers, a commit per step", 3, False),
    ]
    results = [(label, measure(n, args.steps, args.metrics, per_row)) for label, n, per_row in cases]
    base = results[0][1]["rows_per_s"]
    print(f"runs.db: {args.steps} steps x {args.metrics} metrics per writer, reader polling every {POLL_S}s\n")
    print("| case | rows | seconds | rows/s | vs baseline | lost | duplicated |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in results:
        print(f"| {label} | {r['rows']} | {r['seconds']:.2f} | {r['rows_per_s']:,.0f} | "
              f"{r['rows_per_s'] / base:.1f}x | {r['lost']} | {r['duplicated']} |")
    if any(r["lost"] or r["duplicated"] or r["stored"] != r["rows"] for _, r in results):
        sys.exit("FAIL: the reader missed or repeated rows")


if __name__ == "__main__":
    main()
