"""A worker that fails where it did not expect to is said, not lost.

Textual tells a worker's state changes to the node that started it, and they do not bubble: the app and
every screen that runs workers take this handler, so that an exception no worker turned into a message of
its own reaches the user (the workers run with exit_on_error=False: the console stays up).
"""

from __future__ import annotations

from textual.worker import Worker, WorkerState


class SaysWorkerFailures:
    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            error = event.worker.error
            self.app.notify(f"{type(error).__name__}: {error}", title=f"{event.worker.name} failed",  # type: ignore[attr-defined]
                            severity="error", timeout=15, markup=False)
