"""One `poller run`: find due users, claim, send, mark.

The order per batch never changes: select (no side effects), claim and
commit, connect and send, then mark each notification on its own. A run
that stops early releases the claims it did not attempt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import IO, Any, Protocol

import sqlalchemy as sa

from poller import db, store
from poller.errors import DatabaseError, MailStalled, PollerError
from poller.mail import Backend, BackendFactory, Outcome, Status, backend_factory, envelope_sender
from poller.message import Recipient, build_message, new_message_id
from poller.schema import sent_notifications
from poller.settings import Rule, Settings, redact_url

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


class Progress(Protocol):
    def advance(self, count: int = 1) -> None: ...


@dataclasses.dataclass(frozen=True)
class Preview:
    """A notification that a dry run would send."""

    rule: str
    user_id: str
    email: str
    name: str
    subject: str
    retry: bool


@dataclasses.dataclass
class RunResult:
    """Counts of one run; `ok` is what decides exit 0."""

    eligible: int = 0  # due users with valid data, including those another run claimed first
    sent: int = 0
    failed: int = 0  # permanently refused, or out of attempts
    deferred: int = 0  # transient error: a later run retries
    skipped: int = 0  # invalid rows, logged with the user id
    claimed_elsewhere: int = 0  # another run claimed them between our SELECT and INSERT
    waiting_retry: int = 0  # deferred by an earlier run, not due again until their next_attempt_at
    released: int = 0  # claimed but not attempted when the run stopped; the next run takes them
    dry_run: bool = False
    duration_seconds: float = 0.0
    previews: list[Preview] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.deferred == 0

    def add(self, field: str, count: int = 1) -> None:
        with self.lock:
            setattr(self, field, getattr(self, field) + count)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "eligible": self.eligible,
            "sent": self.sent,
            "failed": self.failed,
            "deferred": self.deferred,
            "skipped": self.skipped,
            "claimed_elsewhere": self.claimed_elsewhere,
            "waiting_retry": self.waiting_retry,
            "released": self.released,
            "dry_run": self.dry_run,
            "duration_seconds": round(self.duration_seconds, 3),
        }
        if self.dry_run:
            data["would_send"] = [dataclasses.asdict(preview) for preview in self.previews]
        return data

    def summary(self) -> str:
        prefix = "Dry run: " if self.dry_run else ""
        verb = "would send" if self.dry_run else "sent"
        count = len(self.previews) if self.dry_run else self.sent
        # Only a run that stopped early releases claims, so the count shows only then.
        released = f", released unsent {self.released}" if self.released else ""
        return (
            f"{prefix}{self.eligible} eligible, {verb} {count}, failed {self.failed}, "
            f"deferred {self.deferred}, skipped {self.skipped}, claimed by another run {self.claimed_elsewhere}, "
            f"waiting for a retry {self.waiting_retry}{released} in {self.duration_seconds:.2f} s"
        )


class RunStopped(PollerError):
    """Wraps the error that ended a run early, with the counts so far."""

    def __init__(self, cause: PollerError, result: RunResult) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.result = result
        self.exit_code = cause.exit_code


def aware(now: datetime) -> datetime:
    return now.replace(tzinfo=timezone.utc)


class Run:
    """The state of one run: engine, users table, mail backends, claim token."""

    def __init__(
        self,
        settings: Settings,
        *,
        stdout: IO[str],
        clock: Clock = store.utcnow,
        progress: Progress | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.progress = progress
        self.token = uuid.uuid4().hex
        self.result = RunResult()
        self.sender = settings.sender
        self.envelope_sender = envelope_sender(self.sender)
        self.make_backend: BackendFactory = backend_factory(settings, stdout)
        self.engine = db.create_engine(settings.database_url)
        # Per worker slot: slot N's SMTP backend and, on SQLite in WAL mode,
        # its mark connection. Only worker N touches slot N.
        self.backends: dict[int, Backend] = {}
        self.lease_lock = threading.Lock()
        self.last_refresh = clock()
        self.stop = threading.Event()
        self.fatal: PollerError | None = None
        self.claimed_count = 0

        self.mark_connections: dict[int, sa.Connection] = {}
        with db.database_errors(settings.database_url, "connecting"), self.engine.connect() as connection:
            db.check_migrated(connection)
            self.users = db.reflect_users(connection, settings)
            self.fast_marks = connection.dialect.name == "sqlite" and db.sqlite_journal_mode(connection) == "wal"

    def close(self) -> None:
        for connection in self.mark_connections.values():
            # The pool hands this connection out again, so restore the
            # default before returning it: claims must sync fully.
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                connection.exec_driver_sql("PRAGMA synchronous=FULL")
                connection.commit()
            connection.close()
        self.mark_connections.clear()
        for backend in self.backends.values():
            backend.close()
        self.backends.clear()
        self.engine.dispose()

    # Finding work ---------------------------------------------------------

    def valid_batches(self, rule: Rule) -> Iterator[list[Recipient]]:
        """Yield due users in batches, logging and counting the invalid ones."""
        for batch in store.iter_due_users(self.engine, self.users, rule, self.settings.batch_size):
            recipients = []
            for candidate in batch:
                checked = store.validate(candidate, rule)
                if isinstance(checked, store.Skipped):
                    self.result.add("skipped")
                    log.warning("Skipping user %s for rule %s: %s", checked.user_id, rule.name, checked.reason)
                elif checked is not None:
                    recipients.append(checked)
            self.result.add("eligible", len(recipients))
            yield recipients

    def current_recipients(
        self, rule: Rule, rows: Sequence[tuple[int, str, str, str, int]]
    ) -> dict[str, Recipient | str]:
        """Re-read the users behind retried rows: a Recipient, or the reason they cannot be notified now.

        A user whose points fell below the threshold since the claim is still
        notified, because they did reach it.
        """
        with self.engine.connect() as connection:
            found = store.fetch_users_by_id(connection, self.users, [row[1] for row in rows])
        current: dict[str, Recipient | str] = {}
        for _row_id, user_id, _email, _message_id, _attempts in rows:
            candidate = found.get(user_id)
            if candidate is None:
                current[user_id] = "user no longer exists in the users table"
                continue
            checked = store.validate(candidate, rule, check_points=False)
            if isinstance(checked, Recipient):
                current[user_id] = checked
            else:
                current[user_id] = checked.reason if checked is not None else "invalid row"
        return current

    # Running --------------------------------------------------------------

    def execute(self, rules: Sequence[Rule], *, limit: int | None) -> RunResult:
        started = time.monotonic()
        try:
            for rule in rules:
                remaining = None if limit is None else limit - self.claimed_count
                if remaining is not None and remaining <= 0:
                    break
                self.run_rule(rule, limit)
        except PollerError as exc:
            raise RunStopped(exc, self.result) from exc
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            error = DatabaseError(
                f"Database error during the run at {redact_url(self.settings.database_url)}: "
                f"{db.describe_error(exc, self.settings.database_url)}"
            )
            raise RunStopped(error, self.result) from None
        finally:
            self.result.duration_seconds = time.monotonic() - started
            self.release_claims()
            self.count_waiting(rules)
        return self.result

    def count_waiting(self, rules: Sequence[Rule]) -> None:
        """Count the notifications deferred by earlier runs, which this run could not retry yet."""
        try:
            # Rows this run deferred wait too, but they are counted as deferred.
            waiting = store.count_waiting(self.engine, rules, self.clock())
            self.result.waiting_retry = max(0, waiting - self.result.deferred)
        except sa.exc.SQLAlchemyError as exc:
            log.debug("Could not count notifications waiting for a retry: %s", exc)

    def release_claims(self) -> None:
        """Give back every claim still held, so the next run retries them at once.

        This also runs after Ctrl-C or SIGTERM. A message interrupted during
        DATA may have been accepted; its retry reuses the Message-ID.
        """
        try:
            released = store.release(self.engine, self.token)
        except sa.exc.SQLAlchemyError as exc:
            log.warning(
                "Could not release this run's claims (%s); they become retryable after --lease",
                db.describe_error(exc, self.settings.database_url),
            )
            return
        self.result.released = released
        if released:
            log.info("Released %d claimed notifications that were not sent; the next run retries them", released)

    def room(self, limit: int | None) -> int | None:
        return None if limit is None else max(0, limit - self.claimed_count)

    def run_rule(self, rule: Rule, limit: int | None) -> None:
        # Retries first: they have waited longest.
        while (room := self.room(limit)) is None or room > 0:
            size = self.settings.batch_size if room is None else min(room, self.settings.batch_size)
            rows = store.claim_retryable(
                self.engine, rule, token=self.token, now=self.clock(), lease=self.settings.lease, limit=size
            )
            if not rows:
                break
            self.claimed_count += len(rows)
            self.result.add("eligible", len(rows))
            self.deliver(self.retry_claims(rule, rows))

        for recipients in self.valid_batches(rule):
            room = self.room(limit)
            if room is not None:
                if room <= 0:
                    break
                recipients = recipients[:room]
            if not recipients:
                continue
            self.connect_first()
            message_ids = [new_message_id(self.sender) for _ in recipients]
            claims = store.claim_new(
                self.engine, rule, recipients, token=self.token, now=self.clock(), message_ids=message_ids
            )
            self.result.add("claimed_elsewhere", len(recipients) - len(claims))
            self.claimed_count += len(claims)
            self.last_refresh = self.clock()
            self.deliver(claims)

    def retry_claims(self, rule: Rule, rows: Sequence[tuple[int, str, str, str, int]]) -> list[store.Claim]:
        current = self.current_recipients(rule, rows)
        claims = []
        for row_id, user_id, email, message_id, attempts in rows:
            recipient = current[user_id]
            if isinstance(recipient, str):
                placeholder = Recipient(user_id, email, "", rule.threshold)
                claim = store.Claim(row_id, self.token, rule, message_id, attempts, placeholder)
                store.mark_failed(self.engine, claim, f"not retried: {recipient}", attempted=False)
                self.result.add("failed")
                log.error("Notification for user %s (rule %s) failed: %s", user_id, rule.name, recipient)
                continue
            if recipient.email != email:
                log.info("User %s changed address since the first attempt; sending to the new one", user_id)
            claims.append(store.Claim(row_id, self.token, rule, message_id, attempts, recipient))
        self.connect_first()
        return claims

    def connect_first(self) -> None:
        """Open the first mail connection before claiming, so a dead server claims nothing."""
        if not self.backends:
            self.backend(0)

    def mark_connection(self, slot: int) -> sa.Engine | sa.Connection:
        """Return what worker `slot` records sent marks through.

        On SQLite in WAL mode that is a connection kept open for the run with
        PRAGMA synchronous=NORMAL: each mark is committed without waiting for
        the disk, which is most of a mark's cost. A crash of poller loses no
        committed mark. A power failure can lose the last ones, and those
        messages are then sent again with their stored Message-ID, because
        their claims were committed with a full sync. Other databases mark through
        the engine's pool.
        """
        if not self.fast_marks:
            return self.engine
        connection = self.mark_connections.get(slot)
        if connection is None:
            connection = self.engine.connect()
            connection.exec_driver_sql("PRAGMA synchronous=NORMAL")
            connection.commit()
            self.mark_connections[slot] = connection
        return connection

    def backend(self, slot: int) -> Backend:
        """Return worker `slot`'s mail backend, connecting it on first use."""
        backend = self.backends.get(slot)
        if backend is None:
            backend = self.make_backend()
            connect = getattr(backend, "connect", None)
            if connect is not None:
                connect()
            self.backends[slot] = backend
        return backend

    def deliver(self, claims: Sequence[store.Claim]) -> None:
        """Send each claim over up to --smtp-connections connections; raise the first fatal error.

        Each worker slot keeps its SMTP connection (and, on SQLite, its mark
        connection) from batch to batch, so a run never has more than
        --smtp-connections connections open to the mail server.
        """
        claim_iterator = iter(claims)
        iterator_lock = threading.Lock()

        def next_claim() -> store.Claim | None:
            with iterator_lock:
                return None if self.stop.is_set() else next(claim_iterator, None)

        def worker(slot: int) -> None:
            while (claim := next_claim()) is not None:
                self.send_guarded(claim, slot)

        workers = min(self.settings.smtp_connections, len(claims))
        if workers <= 1:
            worker(0)
        else:
            threads = [
                threading.Thread(target=worker, args=(slot,), name=f"poller-smtp-{slot}") for slot in range(workers)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        if self.fatal is not None:
            raise self.fatal

    def send_guarded(self, claim: store.Claim, slot: int) -> None:
        """Send one claim; record an error that ends the run in self.fatal."""
        try:
            self.send_one(claim, slot)
        except PollerError as exc:
            self.fail(exc)
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            self.fail(
                DatabaseError(
                    f"Database error while recording a delivery: {db.describe_error(exc, self.settings.database_url)}"
                )
            )

    def fail(self, error: PollerError) -> None:
        with self.lease_lock:
            if self.fatal is None:
                self.fatal = error
        self.stop.set()

    def keep_lease(self) -> None:
        with self.lease_lock:
            now = self.clock()
            if (now - self.last_refresh).total_seconds() > self.settings.lease / 2:
                store.refresh_claims(self.engine, self.token, now)
                self.last_refresh = now

    def send_one(self, claim: store.Claim, slot: int) -> None:
        self.keep_lease()
        recipient = claim.recipient
        message = build_message(
            recipient, claim.rule, sender=self.sender, message_id=claim.message_id, now=aware(self.clock())
        )

        try:
            outcome = self.backend(slot).send(message, self.envelope_sender, recipient.email)
        except MailStalled as exc:
            # This message went out like the unconfirmed ones before it, so
            # it is recorded the same way before the run stops.
            self.record(claim, Outcome(Status.TRANSIENT, exc.reply), slot)
            raise
        self.record(claim, outcome, slot)

    def record(self, claim: store.Claim, outcome: Outcome, slot: int) -> None:
        """Mark the claim sent, failed or deferred according to the server's outcome."""
        recipient = claim.recipient
        now = self.clock()
        if outcome.status is Status.ACCEPTED:
            store.mark_sent(self.mark_connection(slot), claim, now)
            self.result.add("sent")
            log.debug("Sent %s to user %s (rule %s)", claim.message_id, recipient.user_id, claim.rule.name)
        elif outcome.status is Status.PERMANENT:
            store.mark_failed(self.engine, claim, outcome.reply)
            self.result.add("failed")
            log.error(
                "Mail server refused user %s (rule %s): %s. Once the address is fixed, "
                "`poller retry --failed --user %s` makes the notification due again.",
                recipient.user_id,
                claim.rule.name,
                outcome.reply,
                recipient.user_id,
            )
        else:
            status = store.mark_transient(
                self.engine,
                claim,
                now,
                outcome.reply,
                max_attempts=self.settings.max_attempts,
                backoff=self.settings.retry_backoff,
            )
            if status == "failed":
                self.result.add("failed")
                log.error(
                    "Giving up on user %s (rule %s) after %d attempts: %s",
                    recipient.user_id,
                    claim.rule.name,
                    claim.attempts + 1,
                    outcome.reply,
                )
            else:
                self.result.add("deferred")
                log.warning(
                    "Deferred user %s (rule %s): %s; a later run retries",
                    recipient.user_id,
                    claim.rule.name,
                    outcome.reply,
                )
        if self.progress is not None:
            self.progress.advance()


def run(
    settings: Settings,
    rules: Sequence[Rule],
    *,
    stdout: IO[str],
    limit: int | None = None,
    clock: Clock = store.utcnow,
    progress: Progress | None = None,
) -> RunResult:
    """Notify every due user once; return the counts.

    Raises ConfigError for bad settings before touching anything, and
    RunStopped (carrying the counts so far) when the database or the mail
    server fails during the run.
    """
    job = Run(settings, stdout=stdout, clock=clock, progress=progress)
    try:
        return job.execute(rules, limit=limit)
    finally:
        job.close()


def dry_run(
    settings: Settings, rules: Sequence[Rule], *, limit: int | None = None, clock: Clock = store.utcnow
) -> RunResult:
    """List who `run` would notify, rendering every message; write and send nothing."""
    started = time.monotonic()
    result = RunResult(dry_run=True)
    engine = db.create_engine(settings.database_url)
    sender = settings.sender
    envelope_sender(sender)
    try:
        with db.database_errors(settings.database_url, "connecting"), engine.connect() as connection:
            db.check_migrated(connection)
            users = db.reflect_users(connection, settings)
        job = _DryRun(settings, engine, users, result, clock)
        for rule in rules:
            for preview in job.previews(rule):
                if limit is not None and len(result.previews) >= limit:
                    break
                message = build_message(
                    Recipient(preview.user_id, preview.email, preview.name, rule.threshold),
                    rule,
                    sender=sender,
                    message_id=new_message_id(sender),
                )
                if not preview.subject:  # a retry: its subject is rendered only here
                    preview = dataclasses.replace(preview, subject=str(message["Subject"]))
                result.previews.append(preview)
        result.waiting_retry = store.count_waiting(engine, rules, clock())
    finally:
        engine.dispose()
    result.duration_seconds = time.monotonic() - started
    return result


class _DryRun:
    def __init__(
        self, settings: Settings, engine: sa.Engine, users: db.UsersTable, result: RunResult, clock: Clock
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.users = users
        self.result = result
        self.clock = clock

    def previews(self, rule: Rule) -> Iterable[Preview]:
        condition = store.retryable_condition(rule, self.clock(), self.settings.lease)
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(sent_notifications.c.user_id, sent_notifications.c.email)
                .where(condition)
                .order_by(sent_notifications.c.id)
            ).all()
            current = store.fetch_users_by_id(connection, self.users, [row.user_id for row in rows])
        for row in rows:
            # The same re-read as a real retry: the user's current address
            # and name, falling back to the stored address for a user who
            # is gone (the run would mark that one failed).
            candidate = current.get(row.user_id)
            email, name = row.email, ""
            if candidate is not None:
                checked = store.validate(candidate, rule, check_points=False)
                if isinstance(checked, Recipient):
                    email, name = checked.email, checked.name
            self.result.eligible += 1
            yield Preview(rule.name, row.user_id, email, name, "", True)

        for batch in store.iter_due_users(self.engine, self.users, rule, self.settings.batch_size):
            for candidate in batch:
                checked = store.validate(candidate, rule)
                if isinstance(checked, store.Skipped):
                    self.result.skipped += 1
                    log.warning("Skipping user %s for rule %s: %s", checked.user_id, rule.name, checked.reason)
                elif checked is not None:
                    self.result.eligible += 1
                    message = build_message(
                        checked, rule, sender=self.settings.sender, message_id="<dry-run@localhost>"
                    )
                    yield Preview(
                        rule.name, checked.user_id, checked.email, checked.name, str(message["Subject"]), False
                    )
