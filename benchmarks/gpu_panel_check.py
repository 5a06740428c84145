"""The GPU panel against a real NVIDIA driver: a busy CUDA process in its own process group stands in
for a run, and the console (headless, its real NVML sampler) must show the GPU's readings, a history,
and that run on the GPU it uses.

    python benchmarks/gpu_panel_check.py      (on a machine with an NVIDIA GPU and torch)
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUSY = """
import torch, time
x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
print("busy", flush=True)
end = time.time() + 60
while time.time() < end:
    for _ in range(50):
        x = (x @ x).tanh()
    torch.cuda.synchronize()
"""


async def main() -> None:
    from console.app import RlhfConsole
    from engine.gpu import GpuSampler
    from engine.store import Store

    busy = subprocess.Popen([sys.executable, "-c", BUSY], start_new_session=True, stdout=subprocess.PIPE, text=True)
    assert busy.stdout.readline().strip() == "busy"
    try:
        sampler = GpuSampler()
        for reading in sampler.read():
            print("reading:", reading)
        sampler.close()
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "runs.db"
            with Store(db) as store:
                run_id = store.create_run(stage="ppo", name="gpu-busy", recipe="x.yaml", config="{}",
                                          output_root=str(Path(tmp) / "runs"))
                store.update_run(run_id, status="running", pgid=busy.pid, pid=busy.pid)
            app = RlhfConsole(db)
            async with app.run_test(size=(100, 30)) as pilot:
                await pilot.pause(1.0)
                await pilot.press("g")
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and len(app.gpu_history.get(0, {}).get("util", [])) < 4:
                    await pilot.pause(0.25)
                await pilot.pause(0.5)
                assert app.gpu_unavailable is None, app.gpu_unavailable
                stats = [f"{card.query_one('.stats').render()}\n{card.query_one('.procs').render()}"
                         for card in app.screen.query("GpuCard")]
                print("\n".join(stats))
                print("utilisation history:", app.gpu_history[0]["util"])
                on_gpu = [i for i, r in enumerate(app.gpu_readings) if busy.pid in r.pids]
                assert on_gpu, "the busy process is on no GPU"
                assert f"run {run_id}" in stats[on_gpu[0]], stats
                assert max(app.gpu_history[on_gpu[0]]["util"]) > 0
                print(f"OK: run {run_id} shown on GPU {on_gpu[0]}")
    finally:
        os.killpg(busy.pid, 9)
        busy.wait()


if __name__ == "__main__":
    asyncio.run(main())
