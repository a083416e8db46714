"""Reference programs that poller is measured against.

- bare: the limit, one reused smtplib connection and no database.
- naive: what people write today, a new SMTP connection per message.
- anti-join: the due-users query alone, through the sqlite3 module, in a
  process that has also imported SQLAlchemy as poller does.

Each prints one JSON object: how many messages the server accepted (or
rows the query returned) and the seconds the work took, start-up excluded.
The messages are rendered by poller's own build_message, so that they are
the same messages poller sends.
"""

from __future__ import annotations

import argparse
import json
import smtplib
import time
from collections.abc import Iterator
from decimal import Decimal
from email import policy
from email.message import EmailMessage
from urllib.parse import urlsplit

from poller.message import Recipient, build_message, new_message_id
from poller.settings import Rule

SENDER = "Game <game@example.com>"
RULE = Rule(
    "points-100",
    Decimal(100),
    "Well done, $name: $threshold points!",
    "Hello $name,\n\nYou reached $points points. Well done!\n",
)

ANTI_JOIN = (
    "SELECT u.id, u.email, u.points, u.name FROM users AS u WHERE u.points >= 100 AND NOT EXISTS "
    "(SELECT 1 FROM sent_notifications AS s WHERE s.rule = 'points-100' AND s.user_id = CAST(u.id AS TEXT))"
)


def messages(count: int) -> Iterator[tuple[str, EmailMessage]]:
    """Yield (recipient, message) for user1@example.com onwards, built as poller builds them."""
    for user_id in range(1, count + 1):
        recipient = Recipient(str(user_id), f"user{user_id}@example.com", f"User {user_id}", Decimal(100))
        yield recipient.email, build_message(recipient, RULE, sender=SENDER, message_id=new_message_id(SENDER))


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 25


def send_bare(url: str, count: int) -> int:
    """Send `count` messages over one connection; return how many the server accepted."""
    host, port = _address(url)
    accepted = 0
    with smtplib.SMTP(host, port) as smtp:
        for recipient, message in messages(count):
            refused = smtp.sendmail("game@example.com", [recipient], message.as_bytes(policy=policy.SMTP))
            accepted += recipient not in refused
    return accepted


def send_naive(url: str, count: int) -> int:
    """Send `count` messages, each over a new connection."""
    host, port = _address(url)
    accepted = 0
    for recipient, message in messages(count):
        with smtplib.SMTP(host, port) as smtp:
            refused = smtp.sendmail("game@example.com", [recipient], message.as_bytes(policy=policy.SMTP))
            accepted += recipient not in refused
    return accepted


def anti_join(path: str) -> int:
    """Run the due-users query on a SQLite file; return the number of rows."""
    import sqlite3

    import sqlalchemy  # noqa: F401  (poller pays for this import too)

    connection = sqlite3.connect(path)
    try:
        return len(connection.execute(ANTI_JOIN).fetchall())
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run one reference program and print its counts as JSON.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("bare", "naive"):
        command = commands.add_parser(name)
        command.add_argument("--mail-url", required=True, help="smtp://HOST:PORT of the sink")
        command.add_argument("--count", type=int, required=True, help="How many messages to send.")
    command = commands.add_parser("anti-join")
    command.add_argument("path", help="SQLite file made by benchmarks.generate")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.command == "bare":
        count = send_bare(args.mail_url, args.count)
    elif args.command == "naive":
        count = send_naive(args.mail_url, args.count)
    else:
        count = anti_join(args.path)
    print(json.dumps({"count": count, "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
