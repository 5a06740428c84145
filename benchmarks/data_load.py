"""JSON-array data files load in linear time: records/s at 10k, 40k and 52k records (Alpaca's size),
against the same records as JSON Lines, on every rank's path (`read_records` and the SFT format adapter).

    python benchmarks/data_load.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import DataSource  # noqa: E402
from engine.data import load_conversations  # noqa: E402


def records(n: int) -> list[dict]:
    return [{"instruction": f"Question {k}: what is {k} plus {k}?", "input": "" if k % 3 else f"context {k}",
             "output": f"The answer is {2 * k}. " * 4} for k in range(n)]


def timed(path: Path) -> float:
    start = time.perf_counter()
    mixture = load_conversations([DataSource(path=str(path))])
    assert mixture.train
    return time.perf_counter() - start


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="data_load_"))
    print("| records | file MB | JSON array (s) | JSON Lines (s) | array / lines | array µs per record |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in (10_000, 40_000, 52_000):
        rows = records(n)
        array, lines = folder / f"a{n}.json", folder / f"l{n}.jsonl"
        array.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n", encoding="utf-8")
        lines.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
        a, b = timed(array), timed(lines)
        print(f"| {n:,} | {array.stat().st_size / 1e6:.1f} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {1e6 * a / n:.1f} |")


if __name__ == "__main__":
    main()
