"""A smoke run of the benchmark script: every program delivers what it should.

Only the counts are checked here; the ratios belong to docs/benchmarks.md,
because timing on a shared machine is too noisy for a test.
"""

from __future__ import annotations

import pytest

from benchmarks import run
from tests.conftest import _server_url


@pytest.fixture(scope="module")
def smoke_results() -> dict[str, run.Result]:
    results = run.run_targets(run.SMOKE, list(run.TARGETS), _server_url("postgresql"), lambda result: None)
    return {result.target.split(".")[0]: result for result in results}


@pytest.mark.parametrize("target", list(run.TARGETS))
def test_benchmark_smoke_counts(smoke_results: dict[str, run.Result], target: str) -> None:
    result = smoke_results[target]
    if target == "6" and not result.counts:
        pytest.skip("POLLER_TEST_POSTGRESQL_URL is not set")

    assert result.counts, f"target {target} measured nothing"
    for name, (delivered, expected) in result.counts.items():
        assert delivered == expected, f"target {target}, {name}: {delivered} instead of {expected}"
