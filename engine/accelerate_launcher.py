"""The launcher process of `rlhf launch`: accelerate's own `accelerate launch` command, run as it is, but for
one thing. A stop sends the launcher SIGTERM; torchrun passes it on to the ranks, waits for them to save and
end, and then raises SignalException out of accelerate, whose traceback was the last thing in the log of every
cleanly stopped multi-process run. Here that becomes one line and the signal's exit status."""

from __future__ import annotations

import signal
import sys


def main() -> int:
    from accelerate.commands.launch import main as accelerate_launch

    try:
        accelerate_launch()
    except Exception as err:
        number = getattr(err, "sigval", None)
        if type(err).__name__ != "SignalException" or number is None:
            raise
        name = signal.Signals(number).name
        print(f"[rlhf] launcher: {name} passed on to the ranks, which have ended", file=sys.stderr, flush=True)
        return 128 + int(number)
    return 0


if __name__ == "__main__":
    sys.exit(main())
