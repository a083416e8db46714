"""A local SMTP sink that counts accepted messages, standing in for a relay.

The sink runs in its own process, so that it does not compete for the GIL
with the program under test. With a delay, it waits that many milliseconds
before its reply to each message's DATA, which is where a remote relay
spends its time (queueing the message, scanning it). The other replies
come at once.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.synchronize
import socket
from collections import Counter
from typing import Any

from aiosmtpd.controller import Controller


class CountingHandler:
    """aiosmtpd handler that counts messages and each recipient's copies."""

    def __init__(self, delay_ms: float, count: Any, duplicates: Any) -> None:
        self.delay = delay_ms / 1000
        self.count = count
        self.duplicates = duplicates
        self.seen: Counter[str] = Counter()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        with self.count.get_lock():
            self.count.value += 1
        for address in envelope.rcpt_tos:
            self.seen[address] += 1
            if self.seen[address] > 1:
                with self.duplicates.get_lock():
                    self.duplicates.value += 1
        return "250 Message accepted"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _serve(port: int, delay_ms: float, count: Any, duplicates: Any, ready: Any, stop: Any) -> None:
    handler = CountingHandler(delay_ms, count, duplicates)
    # The default data size limit and timeouts are fine; only the count matters.
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    ready.set()
    stop.wait()
    controller.stop()


class Sink:
    """A counting SMTP sink in a child process on 127.0.0.1 and a free port.

    `count` is the number of messages accepted so far, and `duplicates` how
    many of them went to a recipient that had already received one.
    """

    def __init__(self, delay_ms: float = 0) -> None:
        self.delay_ms = delay_ms
        self.port = free_port()
        context = multiprocessing.get_context("spawn")
        self._count = context.Value("q", 0)
        self._duplicates = context.Value("q", 0)
        self._ready = context.Event()
        self._stop = context.Event()
        self._process = context.Process(
            target=_serve,
            args=(self.port, delay_ms, self._count, self._duplicates, self._ready, self._stop),
            daemon=True,
        )

    def __enter__(self) -> Sink:
        self._process.start()
        if not self._ready.wait(30):
            self._process.kill()
            raise RuntimeError(f"The SMTP sink did not start on 127.0.0.1:{self.port} within 30 s")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    @property
    def count(self) -> int:
        return int(self._count.value)

    @property
    def duplicates(self) -> int:
        return int(self._duplicates.value)
