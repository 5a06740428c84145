"""The GPU panel as a screen of its own (`g`)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Static

from console.widgets.gpu_panel import GpuPanel


class GpuScreen(Screen):
    BINDINGS = [Binding("escape,g,q", "app.pop_screen", "Back to runs")]

    def compose(self) -> ComposeResult:
        yield Static("[b]GPUs[/b]  sampled every second", id="gpu-title")
        yield GpuPanel(id="gpu-panel")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_readings()

    def refresh_readings(self) -> None:
        app = self.app
        # No GPU to sample (no driver, say): the panel says why; the title claims no sampling.
        title = "[b]GPUs[/b]  none to sample" if app.gpu_unavailable else "[b]GPUs[/b]  sampled every second"
        self.query_one("#gpu-title", Static).update(title)
        self.query_one(GpuPanel).show(app.gpu_readings, app.gpu_unavailable, app.gpu_history, app.run_of_pid)
