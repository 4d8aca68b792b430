"""Fixtures of the fault suite: servers of its own, and one factory for a whole stack.

- ``fault_postgres`` (session): a PostgreSQL cluster of this session's own (one ``initdb``),
  with a migrated template; every stack gets a fresh copy of it.
- ``fault_moto`` (session): a moto server of this session's own, which tests may pause
  (SIGSTOP); it is always resumed before the next test.
- ``start_stack`` (per test): builds a :class:`tests.faults.harness.FaultStack` (own Redis,
  fresh database and bucket, sandbox, web, workers, beat) with the environment the test asks
  for, and stops all of it at the end.

Missing ``redis-server`` or PostgreSQL binaries skip the suite, or fail it where
``INGEST_TEST_REQUIRE_SERVICES=1`` (CI).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.processes import ProcessGroup
from sandbox.stacks import start_moto_server, stop_moto_server
from tests.conftest import skip_or_fail
from tests.faults.harness import RECORDED, FaultStack, MotoProcess, record_early_failure
from tests.plugins.servers import (
    PostgresCluster,
    ServerError,
    postgres_bin_dir,
    redis_server_binary,
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A fault test that failed before its final check still gets a line in the report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call" and report.failed and item.nodeid not in RECORDED:
        why = call.excinfo.exconly() if call.excinfo is not None else "failed"
        record_early_failure(item.nodeid, why.splitlines()[0][:300])


@pytest.fixture(scope="session")
def fault_postgres() -> Iterator[PostgresCluster]:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        skip_or_fail("initdb/pg_ctl not found (fault tests run their own PostgreSQL)")
    assert bin_dir is not None
    try:
        cluster = PostgresCluster.create(bin_dir)
    except ServerError as exc:
        skip_or_fail(f"could not initdb a PostgreSQL cluster of our own: {exc}")
        raise
    try:
        cluster.start()
        cluster.prepare_template()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def fault_moto() -> Iterator[MotoProcess]:
    process, endpoint_url = start_moto_server()
    moto = MotoProcess(process=process, endpoint_url=endpoint_url)
    try:
        yield moto
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)
        stop_moto_server(process)


@pytest.fixture
def start_stack(
    stack_processes: ProcessGroup,
    fault_postgres: PostgresCluster,
    fault_moto: MotoProcess,
    tmp_path: Path,
) -> Iterator[Callable[..., FaultStack]]:
    """``start_stack(env={...}, workers=2, beats=1, ...)`` -> a running :class:`FaultStack`."""
    redis_binary = redis_server_binary()
    if redis_binary is None:
        skip_or_fail("redis-server not found (fault tests run their own Redis)")
    assert redis_binary is not None
    stacks: list[FaultStack] = []

    def start(**options: Any) -> FaultStack:
        stack = FaultStack.start(
            group=stack_processes,
            postgres=fault_postgres,
            moto=fault_moto,
            redis_binary=redis_binary,
            root=tmp_path / f"stack{len(stacks)}",
            **options,
        )
        stacks.append(stack)
        return stack

    try:
        yield start
    finally:
        fault_moto.resume()  # a test that failed while S3 was paused must not stall the next
        for stack in stacks:
            stack.close()
