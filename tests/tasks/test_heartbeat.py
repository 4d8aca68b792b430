"""The worker's liveness signal and `ingest worker-alive`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cli.main import cli
from tasks import heartbeat


@pytest.fixture
def consumer(monkeypatch: pytest.MonkeyPatch) -> heartbeat._ConsumerState:
    state = heartbeat._ConsumerState()
    monkeypatch.setattr(heartbeat, "CONSUMER", state)
    return state


def test_a_running_consumer_with_recent_ticks_is_alive(consumer: Any) -> None:
    consumer.phase = "running"
    consumer.last_tick = time.monotonic()
    assert consumer.alive()


def test_a_consumer_whose_loop_stopped_ticking_is_not_alive(consumer: Any) -> None:
    consumer.phase = "running"
    consumer.last_tick = time.monotonic() - heartbeat.STALE_TICKS_SECONDS - 1
    assert not consumer.alive()


def test_reconnecting_to_a_lost_broker_is_alive_and_a_shut_down_consumer_is_not(
    consumer: Any,
) -> None:
    consumer.phase = "reconnecting"
    consumer.last_tick = time.monotonic() - 3600  # no ticks while the broker is away
    assert consumer.alive()
    consumer.phase = "shut down"
    assert not consumer.alive()


def test_a_stopping_worker_is_not_alive(consumer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.worker import state as worker_state

    consumer.phase = "running"
    monkeypatch.setattr(worker_state, "should_stop", 0)
    assert not consumer.alive()


def _alive(tmp_path: Path, *args: str) -> Any:
    return CliRunner().invoke(
        cli,
        ["worker-alive", *args],
        env={"INGEST_WORKER_HEARTBEAT_FILE": str(tmp_path / "hb"), "INGEST_VAR_DIR": str(tmp_path)},
    )


def test_worker_alive_reads_the_heartbeat_files_age(tmp_path: Path) -> None:
    missing = _alive(tmp_path)
    assert missing.exit_code == 1 and "no heartbeat" in missing.output
    heartbeat.touch(tmp_path / "hb")
    assert _alive(tmp_path).exit_code == 0
    old = time.time() - 120
    os.utime(tmp_path / "hb", (old, old))
    stale = _alive(tmp_path, "--max-age", "60")
    assert stale.exit_code == 1
    assert "limit 60 s" in stale.output
    assert _alive(tmp_path, "--max-age", "300").exit_code == 0
