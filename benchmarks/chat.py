"""The chat screen under load: time to first token and tokens/s per pane with two panes streaming, and
the console's key latency (p95) while they stream, against one pane alone. Headless Textual, the tiny
demo model in two worker processes (or `--model FOLDER` for a real one).

    python benchmarks/chat.py [--tokens 400] [--keys 60] [--model FOLDER]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def measure(model: str, second: str | None, tokens: int, keys: int) -> dict[str, float]:
    from textual import events

    from console.app import RlhfConsole
    from console.screens.chat import ChatScreen, ChatSettings
    from engine.gpu import GpuUnavailable

    def no_gpu():
        raise GpuUnavailable("benchmark")

    app = RlhfConsole(os.environ["RLHF_DB"], gpu_sampler=no_gpu, poll_s=1.0)
    result: dict[str, float] = {}
    async with app.run_test(size=(120, 36)) as pilot:
        app.push_screen(ChatScreen(model, second, ChatSettings(temperature=0, max_new_tokens=tokens)))
        while not (isinstance(app.screen, ChatScreen) and app.screen.query("#chat-input")):
            await pilot.pause(0.05)
        screen = app.screen
        while not all(screen.ready.get(s) for s in screen.sides):
            await pilot.pause(0.05)
        box = screen.query_one("#chat-input")
        box.focus()
        box.value = "Tell me a long story."
        await pilot.press("enter")
        panes = [screen.panes[s] for s in screen.sides]
        while not all(p.tokens > 0 for p in panes):
            await pilot.pause(0.01)
        latencies = []
        for k in range(keys):  # typing while both answers stream: how long until the key is in the box
            if not any(p.busy for p in panes):
                break
            start = time.perf_counter()
            # As the terminal driver delivers a key (the pilot's own press waits for the app to go idle,
            # which it never does while answers stream).
            app.post_message(events.Key("x", "x"))
            while not box.value.endswith("x" * (k + 1)):
                await asyncio.sleep(0.0005)
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(0.02)
        while any(p.busy for p in panes):
            await asyncio.sleep(0.05)
        for p in panes:
            figures = str(p.stats.render())
            result[f"{p.side} ttft_s"] = float(figures.split("TTFT ")[1].split(" s")[0])
            result[f"{p.side} tok_s"] = float(figures.split(" tok/s")[0].split("· ")[-1])
        result["keys"] = len(latencies)
        result["key p50 ms"] = 1000 * statistics.median(latencies) if latencies else float("nan")
        result["key p95 ms"] = (1000 * statistics.quantiles(latencies, n=20)[-1] if len(latencies) >= 20
                                else float("nan"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--keys", type=int, default=60)
    parser.add_argument("--model", help="a model folder (default: the tiny demo model)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="chat_bench_"))
    os.environ["RLHF_DB"] = str(work / "runs.db")
    model = args.model
    if model is None:
        from engine.demo import init_demo

        init_demo(work / "demo")
        model = str(work / "demo" / "model")
    alone = asyncio.run(measure(model, None, args.tokens, args.keys))
    both = asyncio.run(measure(model, model, args.tokens, args.keys))
    print(f"\nchat screen, {args.tokens} greedy tokens per answer, model {model}; keys typed while answers stream\n")
    print("| measure | two panes | one pane alone | ratio |")
    print("|---|---:|---:|---:|")
    for name in ("left ttft_s", "left tok_s", "key p50 ms", "key p95 ms"):
        a, b = both[name], alone[name]
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / b if b else float('nan'):.2f}x |")
    print(f"| right ttft_s | {both['right ttft_s']:.3f} | - | - |")
    print(f"| right tok_s | {both['right tok_s']:.3f} | - | - |")
    print(f"| keys measured | {both['keys']:.0f} | {alone['keys']:.0f} | - |")


if __name__ == "__main__":
    main()
