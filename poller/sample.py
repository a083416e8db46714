"""A sample users table for trying poller out (`poller sample-db`)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from poller.errors import ConfigError

NAMES = ("Ada Lovelace", "Grace Hopper", "Alan Turing", "Émilie du Châtelet", "Katherine Johnson", "Edsger Dijkstra")


def create_sample_database(path: str | Path, count: int) -> int:
    """Create `path` with a users table of `count` rows; return how many reach 100 points.

    Raises ConfigError if the file exists, so that a real database is never
    overwritten.
    """
    path = Path(path)
    if path.exists():
        raise ConfigError(f"{str(path)!r} already exists. Choose a new file name for the sample database.")

    rows = []
    for number in range(1, count + 1):
        points = 40 + (number * 37) % 130  # a spread around the default threshold of 100
        name = NAMES[number % len(NAMES)]
        rows.append((number, f"user{number}@example.com", points, name))

    connection = sqlite3.connect(path)
    try:
        with connection:
            connection.execute(
                "CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, points INTEGER NOT NULL DEFAULT 0, name TEXT)"
            )
            connection.execute("CREATE INDEX users_points ON users (points)")
            connection.executemany("INSERT INTO users (id, email, points, name) VALUES (?, ?, ?, ?)", rows)
    finally:
        connection.close()
    return sum(1 for row in rows if row[2] >= 100)
