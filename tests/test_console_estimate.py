"""The launch form shows the memory estimate of what it would launch, before ctrl+s, and follows the form."""

from __future__ import annotations

from textual.widgets import Input, Select, Static

from console.screens.launch import LaunchScreen
from tests.pilot import CONFIGS, console, open_launch_form, sync, wait_for


def estimate_text(form: LaunchScreen) -> str:
    return str(form.query_one("#estimate", Static).render())


@sync
async def test_the_launch_form_shows_the_memory_estimate_and_follows_the_form(workdir):
    app = console()
    async with app.run_test(size=(100, 40)) as pilot:
        form = await open_launch_form(pilot, app)
        # The tiny recipe on the CPU config the form starts with: per process, no GPU verdict.
        await wait_for(pilot, lambda: "memory: peak" in estimate_text(form), 20, "the estimate line")
        assert "per process on CPU" in estimate_text(form) and "largest:" in estimate_text(form)
        assert "disk: up to" in estimate_text(form) and "free" not in estimate_text(form)  # it fits: no more said

        form.query_one("#accelerate", Select).value = str(CONFIGS / "accelerate" / "gpu.yaml")
        # No GPU here: the size judged against is an assumption, and the line says so (it read as this machine's).
        await wait_for(pilot, lambda: "per GPU, fits in 80.00 GiB (assumed: no GPU seen here)" in estimate_text(form),
                       20, "the GPU estimate")
        # A machine with GPUs: judged against its smallest one.
        from engine.gpu import GpuReading

        before_readings = app.gpu_readings
        app.gpu_readings = [GpuReading(index=0, name="small", utilization=0, memory_used=0, memory_total=2 * 2**30,
                                       temperature=30, power=50.0, power_limit=300.0)]
        form._refresh_estimate()
        await wait_for(pilot, lambda: "in 2.00 GiB" in estimate_text(form) and "assumed" not in estimate_text(form),
                       20, "the estimate against this machine's GPU")
        app.gpu_readings = before_readings

        # PPO with a bigger batch: the line follows the fields (a larger peak).
        form.query_one("#stage", Select).value = "ppo"
        await wait_for(pilot, lambda: form.loaded.get("k") == "1" and "per GPU" in estimate_text(form), 20,
                       "the ppo form")
        before = estimate_text(form)
        form.query_one("#field-batch", Input).value = "512"
        await wait_for(pilot, lambda: estimate_text(form) not in (before, ""), 20, "a new estimate")
        # Every one of a trillion saves kept: more than any disk holds, said where they would go
        form.extra = ["ppo.steps=1000000000000", "ppo.save_steps=1", "ppo.save_total_limit=null"]
        form._refresh_estimate()
        await wait_for(pilot, lambda: "exports, and " in estimate_text(form) and " free" in estimate_text(form), 20,
                       "the disk warning")
        assert form.query_one("#estimate", Static).has_class("-too-big")
        form.extra = []

        # A model the estimate cannot read: a short message, and the form goes on working.
        form.query_one("#field-model", Input).value = "demo/no-such-model"
        await wait_for(pilot, lambda: "no estimate" in estimate_text(form), 20, "the estimate's message")
        assert "does not exist" in estimate_text(form) and "\n" not in estimate_text(form).strip()
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: "does not exist" in str(form.query_one("#error-model", Static).render()), 20,
                       "validation still working")
        assert app.is_running and app.screen is form and app.runs == {}


@sync
async def test_validating_refreshes_an_estimate_that_could_not_be_made(workdir):
    """The model appears after the form opened (written by `rlhf demo init`, say): ctrl+t shows the estimate."""
    (workdir / "demo").rename(workdir / "demo-later")
    app = console()
    async with app.run_test(size=(100, 40)) as pilot:
        form = await open_launch_form(pilot, app)
        await wait_for(pilot, lambda: "no estimate" in estimate_text(form), 20, "the estimate's message")
        (workdir / "demo-later").rename(workdir / "demo")
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: "memory: peak" in estimate_text(form), 20, "the estimate")
