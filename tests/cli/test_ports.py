"""``make run`` with a port already taken: one line naming the port and the variable to
change, before anything starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli
from sandbox.processes import free_port

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_taken_port_is_one_line_naming_the_variable(taken_port: int) -> None:
    free = free_port()

    result = CliRunner().invoke(
        cli,
        ["ports-free", "--then", "make run", f"WEB_PORT={taken_port}", f"SANDBOX_PORT={free}"],
    )

    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"ingest: port {taken_port} on 127.0.0.1 is already in use: ")
    assert "set WEB_PORT to a free port (WEB_PORT=" in line and line.endswith(" make run)")
    assert "SANDBOX_PORT" not in line


def test_free_ports_pass_silently() -> None:
    result = CliRunner().invoke(cli, ["ports-free", f"WEB_PORT={free_port()}"])

    assert result.exit_code == 0
    assert result.output == ""


def test_make_run_stops_before_starting_anything(taken_port: int, tmp_path: Path) -> None:
    # make's BIN, with honcho replaced by a script that only says it was started.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ingest").symlink_to(Path(sys.executable).parent / "ingest")
    started = tmp_path / "honcho-started"
    honcho = bin_dir / "honcho"
    honcho.write_text(f"#!/bin/sh\ntouch {started}\n")
    honcho.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update(INGEST_VAR_DIR=str(tmp_path / "var"), MAKEFLAGS="")

    done = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-o",
            ".venv/.installed-stamp",
            "run",
            f"BIN={bin_dir}",
            f"WEB_PORT={taken_port}",
            f"SANDBOX_PORT={free_port()}",
        ],
        cwd=REPOSITORY,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode != 0
    assert f"port {taken_port}" in done.stderr and "WEB_PORT=" in done.stderr
    assert not started.exists()
    assert not (tmp_path / "var").exists()  # not even `ingest db upgrade`
