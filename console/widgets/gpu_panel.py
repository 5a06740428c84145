"""Per GPU, as nvitop shows it: utilisation and memory now as bars on a fixed 0-100 % scale, their last
two minutes as strips on the same scale (a GPU at 97-99 % reads as full, not as swinging from idle to
full), temperature and power, and the processes on it with their memory and the run they belong to."""

from __future__ import annotations

from typing import Any, Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import Static

BARS = " ▁▂▃▄▅▆▇█"  # 0 is a blank: an idle GPU shows nothing, not a low bar


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def level(value: float) -> str:
    """One history cell for a 0-100 value (fixed scale)."""
    clamped = max(0.0, min(100.0, value))
    return BARS[round(clamped / 100 * (len(BARS) - 1))]


class Meter(Widget):
    """A label, a 0-100 % bar across the width, and a value: `util [██████░░░░] 87%`."""

    DEFAULT_CSS = "Meter { height: 1; }"

    def __init__(self, label: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.label, self.percent, self.value = label, 0.0, "-"

    def set(self, percent: float | None, value: str) -> None:
        self.percent, self.value = (percent or 0.0), value
        self.refresh()

    def render(self) -> Text:
        room = max(4, self.size.width - len(self.label) - len(self.value) - 4)
        filled = round(max(0.0, min(100.0, self.percent)) / 100 * room)
        colour = "red" if self.percent >= 90 else "yellow" if self.percent >= 50 else "green"
        return Text.assemble(f"{self.label} ", ("█" * filled, colour), ("░" * (room - filled), "dim"),
                             f"  {self.value}", no_wrap=True, overflow="ellipsis")


class History(Widget):
    """The last samples as one line of cells on a fixed 0-100 % scale, newest on the right."""

    DEFAULT_CSS = "History { height: 1; }"

    def __init__(self, label: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.label, self.values = label, []

    def set(self, values: list[float]) -> None:
        self.values = values
        self.refresh()

    def render(self) -> Text:
        room = max(1, self.size.width - len(self.label) - 1)
        cells = "".join(level(v) for v in self.values[-room:]).rjust(room)
        return Text.assemble((f"{self.label} ", "dim"), (cells, "cyan"), no_wrap=True)


def header(reading: Any) -> Text:
    temp = "-" if reading.temperature is None else f"{reading.temperature:.0f}°C"
    power = "-" if reading.power is None else f"{reading.power:.0f} W"
    if reading.power is not None and reading.power_limit:
        power += f" / {reading.power_limit:.0f} W"
    return Text.assemble((f"GPU {reading.index} ", "bold"), reading.name, f"   {temp}   {power}",
                         no_wrap=True, overflow="ellipsis")


def processes(reading: Any, run_of: Callable[[int], int | None]) -> Text:
    memory = getattr(reading, "process_memory", ()) or ()
    lines = Text(no_wrap=True, overflow="ellipsis")
    if not reading.pids:
        lines.append("  no processes", style="dim")
    for i, pid in enumerate(reading.pids):
        used = memory[i] if i < len(memory) else None
        run = run_of(pid)
        who = f"run {run}" if run is not None else "not a run of this console"
        lines.append(f"  pid {pid:<8} {'-' if used is None else _gib(used) + ' GiB':>10}   {who}")
        if i < len(reading.pids) - 1:
            lines.append("\n")
    return lines


class GpuCard(Vertical):
    DEFAULT_CSS = """
    GpuCard { height: auto; margin-bottom: 1; }
    GpuCard .procs { height: auto; }
    """

    def compose(self) -> ComposeResult:
        yield Static("", classes="stats")
        yield Meter("util", id="util-bar")
        yield Meter("mem ", id="mem-bar")
        yield History("util 2 min", id="util")
        yield History("mem  2 min", id="mem")
        yield Static("", classes="procs")

    def show(self, reading: Any, run_of: Callable[[int], int | None], history: dict[str, list[float]]) -> None:
        self.query_one(".stats", Static).update(header(reading))
        util = reading.utilization
        self.query_one("#util-bar", Meter).set(util, "-" if util is None else f"{util:.0f}%")
        mem = 100.0 * reading.memory_used / max(reading.memory_total, 1)
        self.query_one("#mem-bar", Meter).set(mem, f"{_gib(reading.memory_used)} / {_gib(reading.memory_total)} GiB")
        self.query_one("#util", History).set(list(history.get("util", [])))
        self.query_one("#mem", History).set(list(history.get("mem", [])))
        self.query_one(".procs", Static).update(processes(reading, run_of))


class GpuPanel(VerticalScroll):
    def compose(self) -> ComposeResult:
        yield Static("sampling GPUs…", id="gpu-status")

    def show(self, readings: list[Any] | None, unavailable: str | None, history: dict,
             run_of: Callable[[int], int | None]) -> None:
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
                card.show(reading, run_of, history.get(reading.index, {}))
