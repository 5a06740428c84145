"""Per GPU: utilisation, memory, temperature and power now, a two-minute history as sparklines, and
the runs whose process groups have processes on it."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Sparkline, Static


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def describe(reading: Any, runs: list[int]) -> str:
    util = "-" if reading.utilization is None else f"{reading.utilization:.0f}%"
    temp = "-" if reading.temperature is None else f"{reading.temperature:.0f}°C"
    power = "-" if reading.power is None else f"{reading.power:.0f} W"
    if reading.power is not None and reading.power_limit:
        power += f" / {reading.power_limit:.0f} W"
    used = f"{_gib(reading.memory_used)} / {_gib(reading.memory_total)} GiB"
    who = ", ".join(f"run {r}" for r in runs) if runs else "no run of this console"
    return (f"[b]GPU {reading.index}[/b] {reading.name}   util {util}   mem {used}   {temp}   {power}\n"
            f"  {len(reading.pids)} processes · {who}")


class GpuCard(Vertical):
    DEFAULT_CSS = """
    GpuCard { height: auto; margin-bottom: 1; }
    GpuCard Sparkline { height: 2; }
    GpuCard .spark-label { height: 1; color: $text-muted; }
    """

    def compose(self) -> ComposeResult:
        yield Static("", classes="stats")
        yield Static("utilisation %", classes="spark-label")
        yield Sparkline([], id="util", summary_function=max)
        yield Static("memory %", classes="spark-label")
        yield Sparkline([], id="mem", summary_function=max)

    def show(self, reading: Any, runs: list[int], history: dict[str, list[float]]) -> None:
        self.query_one(".stats", Static).update(describe(reading, runs))
        self.query_one("#util", Sparkline).data = list(history.get("util", []))
        self.query_one("#mem", Sparkline).data = list(history.get("mem", []))


class GpuPanel(VerticalScroll):
    def compose(self) -> ComposeResult:
        yield Static("sampling GPUs…", id="gpu-status")

    def show(self, readings: list[Any] | None, unavailable: str | None, history: dict, runs_of) -> None:
        status = self.query_one("#gpu-status", Static)
        if unavailable:
            status.update(Text.assemble(("No GPU panel: ", "bold"), f"{unavailable}.\n\nEverything else works: runs "
                          "train on the CPU, and a console on a machine with an NVIDIA driver shows its GPUs here."))
            status.display = True
            return
        if readings is None:
            return
        status.display = False
        cards = list(self.query(GpuCard))
        for _ in range(len(readings) - len(cards)):
            card = GpuCard()
            self.mount(card)
            cards.append(card)
        for card, reading in zip(cards, readings):
            if card.is_mounted:
                card.show(reading, runs_of(reading.pids), history.get(reading.index, {}))
