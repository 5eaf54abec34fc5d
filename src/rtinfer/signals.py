"""SIGINT and SIGTERM: the first stops intake and lets the work in flight finish; the second exits.

A process manager (systemd, Kubernetes) sends SIGTERM and waits; a person
presses Ctrl-C. Either way the first signal asks for a graceful stop: stop
reading, finish, flush, acknowledge, exit 0. A second signal means "now":
the process exits at once with status 130, acknowledging nothing more (what
was not acknowledged is redelivered to the next consumer).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["handle_signals"]


def handle_signals(stop: Callable[[], None], *, quiet: bool = False) -> Callable[[], None]:
    """Install the handlers on the running loop; returns a function that removes them."""
    loop = asyncio.get_running_loop()
    received = 0

    def on_signal(signum: int) -> None:
        nonlocal received
        received += 1
        name = signal.Signals(signum).name
        if received == 1:
            if not quiet:
                print(
                    f"\n{name}: stopping intake, finishing in-flight events "
                    f"(send it again to exit at once)",
                    file=sys.stderr,
                )
            stop()
        else:
            print(f"\n{name} again: exiting at once", file=sys.stderr)
            sys.stderr.flush()
            os._exit(130)

    signums = (signal.SIGINT, signal.SIGTERM)
    for signum in signums:
        loop.add_signal_handler(signum, on_signal, signum)

    def remove() -> None:
        for signum in signums:
            loop.remove_signal_handler(signum)

    return remove
