"""Fixtures over :mod:`sandbox.processes` and :mod:`sandbox.stacks` (the supervisor and the
throwaway stacks, which the demo and the benchmarks use too).

Fixtures: ``stack_processes`` (a :class:`ProcessGroup` that prints the tail of every log when
the test failed), ``embedded_stack`` (an environment), ``service_stack`` (an environment;
skips or fails per ``tests.conftest.skip_or_fail`` when the services are not configured).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.processes import QUICK_STOP_SECONDS, ProcessGroup
from sandbox.stacks import StackEnv, embedded_stack_env, service_stack_env

# --- fixtures --------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"_processes_report_{report.when}", report)


@pytest.fixture
def stack_processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessGroup]:
    """A :class:`ProcessGroup` logging under ``tmp_path/logs``; log tails shown on failure."""
    group = ProcessGroup(log_dir=tmp_path / "logs")
    try:
        yield group
    finally:
        group.stop_all(QUICK_STOP_SECONDS)
        call_report = getattr(request.node, "_processes_report_call", None)
        if call_report is not None and call_report.failed and group.processes:
            sys.stderr.write("\n" + group.report() + "\n")


@pytest.fixture
def embedded_stack(tmp_path: Path) -> Iterator[StackEnv]:
    stack = embedded_stack_env(tmp_path / "stack")
    yield stack
    stack.close()


@pytest.fixture
def service_stack(request: pytest.FixtureRequest) -> Iterator[StackEnv]:
    from tests.conftest import TEST_DATABASE_URL, TEST_REDIS_URL, skip_or_fail

    if not TEST_DATABASE_URL or not TEST_REDIS_URL:
        skip_or_fail("INGEST_TEST_DATABASE_URL and INGEST_TEST_REDIS_URL are needed (e2e)")
    assert TEST_DATABASE_URL is not None and TEST_REDIS_URL is not None
    moto = request.getfixturevalue("moto_server")  # only started once we know we need it
    stack = service_stack_env(TEST_DATABASE_URL, TEST_REDIS_URL, moto.endpoint_url)
    yield stack
    stack.close()
