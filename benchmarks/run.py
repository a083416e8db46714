"""Run poller and the reference programs side by side and print each ratio.

Every target is a ratio of two measurements taken in this one run on this
one machine, because absolute times on a shared machine mean little. Each
program runs in its own process, under GNU time for its peak RSS. Data
lives in a temporary directory that is removed at the end; PostgreSQL
measurements create and drop their own database.

    python -m benchmarks.run                     # every target, a few minutes
    python -m benchmarks.run --smoke             # tiny sizes, seconds
    python -m benchmarks.run --only 1,3 --repeat 5
    python -m benchmarks.run --postgresql-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.generate import generate
from benchmarks.sink import Sink

PYTHON = sys.executable
SENDER = "Game <game@example.com>"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much work each target does."""

    messages: int = 2_000  # target 1
    delayed_messages: int = 400  # target 2
    delay_ms: float = 10
    idle_users: int = 1_000_000  # target 3
    idle_eligible: int = 100_000
    small_run: int = 1_000  # target 4
    large_run: int = 100_000
    scale_out_users: int = 4_000  # target 6
    pollers: int = 4
    repeat: int = 3


SMOKE = Sizes(
    messages=20,
    delayed_messages=16,
    delay_ms=2,
    idle_users=2_000,
    idle_eligible=200,
    small_run=10,
    large_run=100,
    scale_out_users=40,
    repeat=1,
)


@dataclasses.dataclass
class Process:
    """One finished program: its wall time, peak RSS and standard output."""

    seconds: float
    max_rss_mb: float
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.stdout.strip().splitlines()[-1])
        return data


@dataclasses.dataclass
class Result:
    """One target: its ratios against the goals, and the delivery counts behind them."""

    target: str
    ratios: dict[str, tuple[float, str, bool]] = dataclasses.field(default_factory=dict)  # value, goal, met
    counts: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # delivered, expected
    notes: list[str] = dataclasses.field(default_factory=list)

    def ratio(self, name: str, value: float, goal: str, met: bool) -> None:
        self.ratios[name] = (value, goal, met)

    def count(self, name: str, delivered: int, expected: int) -> None:
        self.counts[name] = (delivered, expected)

    @property
    def passed(self) -> bool:
        return all(met for _, _, met in self.ratios.values()) and all(a == b for a, b in self.counts.values())


# GNU time reports the child's peak RSS. os.wait4 on the child itself would
# also count the pages it shared with this large process between fork and exec.
TIME = ["/usr/bin/time", "-f", "peak_rss_kb=%M"]


def start(command: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], float]:
    process = subprocess.Popen([*TIME, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return process, time.perf_counter()


def finish(process: subprocess.Popen[str], started: float) -> Process:
    """Wait for `process`; raise RuntimeError unless it exited with 0."""
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{process.args} exited with {process.returncode}: {stderr[-2000:]}")
    stderr, _, last = stderr.rstrip("\n").rpartition("\n")
    peak_kb = int(last.removeprefix("peak_rss_kb="))
    return Process(seconds, peak_kb / 1024, stdout, stderr)


def measure(command: list[str], env: dict[str, str] | None = None) -> Process:
    return finish(*start(command, env))


def poller_env(lock_file: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("POLLER_")}
    env["POLLER_LOCK_FILE"] = str(lock_file)
    return env


def poller_run(database_url: str, mail_url: str, *extra: str) -> list[str]:
    return [
        PYTHON, "-m", "poller", "run", "--quiet", "--json",
        "--database-url", database_url, "--mail-url", mail_url, "--from", SENDER, *extra,
    ]  # fmt: skip


def reference(name: str, *args: str) -> list[str]:
    return [PYTHON, "-m", "benchmarks.references", name, *args]


def median_ratio(pairs: list[tuple[float, float]]) -> float:
    return statistics.median(numerator / denominator for numerator, denominator in pairs)


class Bench:
    def __init__(self, sizes: Sizes, workdir: Path, postgresql_url: str | None) -> None:
        self.sizes = sizes
        self.workdir = workdir
        self.postgresql_url = postgresql_url

    def sqlite(self, users: int, eligible: int, notified: int = 0, *, points_index: bool = True) -> tuple[str, Path]:
        path = self.workdir / f"users-{uuid.uuid4().hex[:8]}.db"
        url = f"sqlite:///{path}"
        generate(url, users=users, eligible=eligible, notified=notified, points_index=points_index)
        return url, path

    def lock(self) -> Path:
        return self.workdir / f"poller-{uuid.uuid4().hex[:8]}.lock"

    def send_with_poller(self, sink: Sink, count: int, *extra: str) -> tuple[Process, dict[str, Any]]:
        url, _ = self.sqlite(count, count)
        process = measure(poller_run(url, sink.url, *extra), poller_env(self.lock()))
        return process, process.json()

    # Targets ---------------------------------------------------------------

    def target_1(self) -> Result:
        """Compare poller's throughput over one connection, with no delay, with the bare smtplib loop."""
        result = Result("1. one connection, loopback sink")
        count = self.sizes.messages
        pairs = []
        for _ in range(self.sizes.repeat):
            with Sink() as sink:
                _, counts = self.send_with_poller(sink, count)
                result.count("poller", sink.count, count)
            with Sink() as sink:
                bare = measure(reference("bare", "--mail-url", sink.url, "--count", str(count))).json()
                result.count("bare loop", sink.count, count)
            # Throughput is count / seconds, so its ratio is the inverse ratio of the times.
            pairs.append((bare["seconds"], counts["duration_seconds"]))
        ratio = median_ratio(pairs)
        result.ratio("poller / bare loop throughput", ratio, ">= 0.8", ratio >= 0.8)
        return result

    def target_2(self) -> Result:
        """Compare eight connections to a slow relay with one, and with a new connection per message."""
        result = Result(f"2. relay delaying each reply to DATA by {self.sizes.delay_ms:g} ms")
        count = self.sizes.delayed_messages
        one, eight, naive = [], [], []
        for _ in range(self.sizes.repeat):
            with Sink(self.sizes.delay_ms) as sink:
                _, counts = self.send_with_poller(sink, count)
                result.count("poller, 1 connection", sink.count, count)
                one.append(counts["duration_seconds"])
            with Sink(self.sizes.delay_ms) as sink:
                _, counts = self.send_with_poller(sink, count, "--smtp-connections", "8")
                result.count("poller, 8 connections", sink.count, count)
                result.count("poller, 8 connections, duplicates", sink.duplicates, 0)
                eight.append(counts["duration_seconds"])
            with Sink(self.sizes.delay_ms) as sink:
                naive.append(
                    measure(reference("naive", "--mail-url", sink.url, "--count", str(count))).json()["seconds"]
                )
                result.count("naive script", sink.count, count)
        against_one = median_ratio(list(zip(one, eight, strict=True)))
        against_naive = median_ratio(list(zip(naive, eight, strict=True)))
        result.ratio("8 connections / 1 connection throughput", against_one, ">= 5", against_one >= 5)
        result.ratio("8 connections / naive script throughput", against_naive, ">= 5", against_naive >= 5)
        return result

    def target_3(self) -> Result:
        """Idle rerun on a large table against the raw anti-join, with and without the points index."""
        sizes = self.sizes
        result = Result(f"3. idle rerun, {sizes.idle_users:,} users, {sizes.idle_eligible:,} eligible and notified")
        url, path = self.sqlite(sizes.idle_users, sizes.idle_eligible, sizes.idle_eligible)
        for indexed in (True, False):
            if not indexed:
                import sqlite3

                with sqlite3.connect(path) as connection:
                    connection.execute("DROP INDEX ix_users_points")
            label = "with" if indexed else "without"
            pairs, peak = [], 0.0
            for _ in range(sizes.repeat):
                with Sink() as sink:
                    poller = measure(poller_run(url, sink.url), poller_env(self.lock()))
                    result.count(f"poller sent, {label} points index", sink.count, 0)
                query = measure(reference("anti-join", str(path)))
                result.count(f"anti-join rows, {label} points index", query.json()["count"], 0)
                pairs.append((poller.seconds, query.seconds))
                peak = max(peak, poller.max_rss_mb)
            ratio = median_ratio(pairs)
            if indexed:
                result.ratio("poller / anti-join wall time", ratio, "<= 1.5", ratio <= 1.5)
                result.ratio("poller peak RSS, MB", peak, "< 100", peak < 100)
            else:
                result.notes.append(f"without an index on users.points: poller / anti-join wall time {ratio:.2f}")
        return result

    def target_4(self) -> Result:
        """Peak RSS of a large run against a small one."""
        result = Result(f"4. memory, {self.sizes.large_run:,} against {self.sizes.small_run:,} messages")
        rss = {}
        for count in (self.sizes.small_run, self.sizes.large_run):
            with Sink() as sink:
                process, _ = self.send_with_poller(sink, count)
                result.count(f"poller, {count} messages", sink.count, count)
            rss[count] = process.max_rss_mb
        ratio = rss[self.sizes.large_run] / rss[self.sizes.small_run]
        result.notes.append(f"peak RSS: {rss[self.sizes.small_run]:.1f} MB and {rss[self.sizes.large_run]:.1f} MB")
        result.ratio("peak RSS ratio", ratio, "<= 1.3", ratio <= 1.3)
        return result

    def target_5(self) -> Result:
        """Start-up of commands that need no database, against importing click."""
        result = Result("5. start-up")
        commands = {"poller --help": ["--help"]}
        if has_cron_show():
            commands["poller cron show"] = ["cron", "show"]
        else:
            result.notes.append("`poller cron show` does not exist in this checkout; measured `poller --help` only")
        click_times = [measure([PYTHON, "-c", "import click"]).seconds for _ in range(max(3, self.sizes.repeat))]
        for label, args in commands.items():
            imported = measure([PYTHON, "-X", "importtime", "-m", "poller", *args])
            heavy = sorted(heavy_imports(imported))
            result.count(f"{label}: modules of SQLAlchemy or Alembic imported", len(heavy), 0)
            times = [measure([PYTHON, "-m", "poller", *args]).seconds for _ in range(max(3, self.sizes.repeat))]
            ratio = statistics.median(times) / statistics.median(click_times)
            result.ratio(f"{label} / import click wall time", ratio, "<= 2", ratio <= 2)
        return result

    def target_6(self) -> Result:
        """Several pollers sharing one PostgreSQL database against one poller."""
        sizes = self.sizes
        result = Result(f"6. scale out: {sizes.pollers} pollers, PostgreSQL, {sizes.scale_out_users:,} users")
        if self.postgresql_url is None:
            result.notes.append("skipped: no --postgresql-url")
            return result
        throughput = {}
        for pollers in (1, sizes.pollers):
            with postgresql_database(self.postgresql_url) as url, Sink(sizes.delay_ms) as sink:
                count = sizes.scale_out_users
                generate(url, users=count, eligible=count)
                started = [start(poller_run(url, sink.url), poller_env(self.lock())) for _ in range(pollers)]
                first = min(when for _, when in started)
                finished = [finish(process, when) for process, when in started]
                wall = time.perf_counter() - first
                sent = sum(process.json()["sent"] for process in finished)
                result.count(f"{pollers} poller(s): messages received", sink.count, count)
                result.count(f"{pollers} poller(s): recorded as sent", sent, count)
                result.count(f"{pollers} poller(s): duplicates", sink.duplicates, 0)
                result.count(f"{pollers} poller(s): rows marked sent", count_sent_rows(url), count)
                throughput[pollers] = count / wall
                del finished
        ratio = throughput[sizes.pollers] / throughput[1]
        result.ratio(f"{sizes.pollers} pollers / 1 poller throughput", ratio, ">= 3", ratio >= 3)
        return result


def heavy_imports(process: Process) -> set[str]:
    """Return the SQLAlchemy and Alembic modules in a `python -X importtime` log."""
    modules = set()
    for line in process.stderr.splitlines():
        if line.startswith("import time:"):
            module = line.rpartition("|")[2].strip()
            if module.split(".")[0] in ("sqlalchemy", "alembic"):
                modules.add(module)
    return modules


def has_cron_show() -> bool:
    probe = subprocess.run([PYTHON, "-m", "poller", "cron", "show", "--help"], capture_output=True, check=False)
    return probe.returncode == 0


def count_sent_rows(url: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.connect() as connection:
        sent = connection.execute(sa.text("SELECT count(*) FROM sent_notifications WHERE status = 'sent'")).scalar_one()
    engine.dispose()
    return int(sent)


@contextmanager
def postgresql_database(server_url: str) -> Iterator[str]:
    """Create a scratch database on the server and drop it afterwards."""
    import sqlalchemy as sa

    name = f"poller_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


TARGETS: dict[str, Callable[[Bench], Result]] = {
    "1": Bench.target_1,
    "2": Bench.target_2,
    "3": Bench.target_3,
    "4": Bench.target_4,
    "5": Bench.target_5,
    "6": Bench.target_6,
}


def run_targets(
    sizes: Sizes, only: list[str], postgresql_url: str | None, report: Callable[[Result], None]
) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="poller-bench-") as workdir:
        bench = Bench(sizes, Path(workdir), postgresql_url)
        for key in only:
            result = TARGETS[key](bench)
            report(result)
            results.append(result)
    return results


def print_result(result: Result) -> None:
    print(f"{result.target}: {'PASS' if result.passed else 'FAIL'}")
    for name, (value, goal, met) in result.ratios.items():
        print(f"    {name}: {value:.2f} (goal {goal}) {'pass' if met else 'FAIL'}")
    for name, (delivered, expected) in result.counts.items():
        mark = "" if delivered == expected else f"  FAIL, expected {expected}"
        print(f"    {name}: {delivered}{mark}")
    for note in result.notes:
        print(f"    note: {note}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure poller against its reference programs.")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes, to check that everything runs.")
    parser.add_argument("--only", default=",".join(TARGETS), help="Comma-separated targets to run, such as 1,3.")
    parser.add_argument("--repeat", type=int, default=None, help="Runs per measurement; the median ratio counts.")
    parser.add_argument(
        "--postgresql-url", default=os.environ.get("POLLER_BENCH_POSTGRESQL_URL"), help="Server for target 6."
    )
    args = parser.parse_args()

    sizes = SMOKE if args.smoke else Sizes()
    if args.repeat is not None:
        sizes = dataclasses.replace(sizes, repeat=args.repeat)
    results = run_targets(sizes, args.only.split(","), args.postgresql_url, print_result)
    sys.exit(0 if all(result.passed for result in results) else 1)


if __name__ == "__main__":
    main()
