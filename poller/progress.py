"""The progress bar of `poller run` on a terminal.

The bar is drawn by click.progressbar on stderr. It appears only when
stderr is a terminal, --quiet is off and more than HANDFUL messages are
due, so cron mail and pipes never contain it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, TextIO, cast

import click
import sqlalchemy as sa

from poller import db, store
from poller.settings import Rule, Settings

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar as ProgressBarType

# Fewer messages than this finish too fast for a bar to be worth drawing.
HANDFUL = 10

BAR_WIDTH = 24  # characters, so label, counts, rate and ETA fit in 80 columns


def count_due(settings: Settings, rules: Sequence[Rule], *, now: Any = None) -> int:
    """Count the notifications a run would attempt: retryable rows plus due users.

    Uses the run's own due query without its batching. Rows with an invalid
    address or points are counted too, so the total can be higher than the
    number sent; the bar then ends early.
    """
    now = store.utcnow() if now is None else now
    engine = db.create_engine(settings.database_url)
    try:
        with db.database_errors(settings.database_url, "counting due users"), engine.connect() as connection:
            db.check_migrated(connection)
            users = db.reflect_users(connection, settings)
            total = 0
            for rule in rules:
                retryable = store.retryable_condition(rule, now, settings.lease)
                total += connection.execute(sa.select(sa.func.count()).where(retryable)).scalar_one()
                due = store.due_users_query(users, rule, None, 1).limit(None).order_by(None).subquery()
                total += connection.execute(sa.select(sa.func.count()).select_from(due)).scalar_one()
    finally:
        engine.dispose()
    return int(total)


def wanted(stream: IO[str], *, quiet: bool) -> bool:
    """True when a bar could be drawn: the stream is a terminal and --quiet is off."""
    if quiet:
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def _show_rate(rate: str | None) -> str | None:
    return rate


class ProgressBar:
    """Thread-safe `advance()` over click's progress bar, with the send rate beside it."""

    def __init__(self, total: int, stream: IO[str]) -> None:
        self.total = total
        self.started = time.monotonic()
        self.done = 0
        self.lock = threading.Lock()
        self.bar: ProgressBarType[str] = click.progressbar(
            iterable=None,
            length=total,
            label="Sending",
            file=cast(TextIO, stream),
            width=BAR_WIDTH,
            show_pos=True,
            show_percent=False,
            show_eta=True,
            item_show_func=_show_rate,
        )

    def __enter__(self) -> ProgressBar:
        self.bar.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.bar.__exit__(kind, value, traceback)

    def rate(self) -> str:
        elapsed = time.monotonic() - self.started
        per_second = self.done / elapsed if elapsed > 0 else 0.0
        return f"{per_second:.1f}/s"

    def advance(self, count: int = 1) -> None:
        # Several SMTP connections advance the bar from their own threads.
        with self.lock:
            self.done += count
            self.bar.update(count, self.rate())


def bar_for(
    settings: Settings, rules: Sequence[Rule], *, limit: int | None, quiet: bool, stream: IO[str]
) -> ProgressBar | None:
    """Return a bar for this run, or None under cron, in a pipe, with --quiet or for a handful of messages.

    The due count runs only when the bar could be drawn, so cron runs do
    not pay for it.
    """
    if not wanted(stream, quiet=quiet):
        return None
    total = count_due(settings, rules)
    if limit is not None:
        total = min(total, limit)
    if total <= HANDFUL:
        return None
    return ProgressBar(total, stream)
