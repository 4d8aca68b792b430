"""``ingest worker --processes N``: the concurrency is shared out, never multiplied."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cli import service


class FakeChild:
    def __init__(self, argv: list[str], env: dict[str, str], exit_code: int | None) -> None:
        self.argv = argv
        self.env = env
        self.exit_code = exit_code
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.exit_code

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)
        self.exit_code = -signum


@dataclass
class Spawned:
    children: list[FakeChild] = field(default_factory=list)
    # Exit codes (None: still running) of the children to come, in order; default 0.
    codes: list[int | None] = field(default_factory=list)


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Spawned:
    monkeypatch.setenv("INGEST_VAR_DIR", str(tmp_path))
    monkeypatch.setattr("cli.service.time.sleep", lambda _seconds: None)
    spawned = Spawned()

    def popen(argv: list[str], env: dict[str, str], **_: Any) -> FakeChild:
        child = FakeChild(argv, env, spawned.codes.pop(0) if spawned.codes else 0)
        spawned.children.append(child)
        return child

    monkeypatch.setattr("cli.service.subprocess.Popen", popen)
    return spawned


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_total_concurrency_is_shared_out_over_the_processes(
    spawned: Spawned,
) -> None:
    handler_before = signal.getsignal(signal.SIGTERM)

    result = CliRunner().invoke(service.worker, ["--concurrency", "5", "--processes", "2"])

    assert result.exit_code == 0, result.output
    assert [_flag(child.argv, "--concurrency") for child in spawned.children] == ["3", "2"]
    assert all(_flag(child.argv, "--processes") == "1" for child in spawned.children)
    names = {child.env["INGEST_WORKER_NODE_NAME"] for child in spawned.children}
    assert len(names) == 2
    assert signal.getsignal(signal.SIGTERM) == handler_before


def test_never_more_processes_than_threads(spawned: Spawned) -> None:
    result = CliRunner().invoke(service.worker, ["--concurrency", "2", "--processes", "4"])

    assert result.exit_code == 0, result.output
    assert [_flag(child.argv, "--concurrency") for child in spawned.children] == ["1", "1"]


def test_a_failed_child_stops_the_others_and_its_code_is_returned(
    spawned: Spawned,
) -> None:
    spawned.codes.extend([3, None])

    result = CliRunner().invoke(service.worker, ["--concurrency", "4", "--processes", "2"])

    assert result.exit_code == 3
    assert spawned.children[1].signals == [signal.SIGTERM]


def test_the_database_brokers_queues_exist_before_any_child_starts(
    spawned: Spawned, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from ingest.queues import ALL_QUEUES

    broker = tmp_path / "broker.sqlite3"
    seen_at_spawn: list[set[str]] = []
    import subprocess

    popen = subprocess.Popen

    def spawn_and_look(argv: list[str], env: dict[str, str], **kwargs: Any) -> Any:
        with sqlite3.connect(broker) as db:
            seen_at_spawn.append({row[0] for row in db.execute("SELECT name FROM kombu_queue")})
        return popen(argv, env=env, **kwargs)

    monkeypatch.setattr("cli.service.subprocess.Popen", spawn_and_look)
    result = CliRunner().invoke(service.worker, ["--concurrency", "4", "--processes", "2"])

    assert result.exit_code == 0, result.output
    # Children starting together would otherwise race to INSERT the same queue rows.
    assert seen_at_spawn == [set(ALL_QUEUES)] * 2
