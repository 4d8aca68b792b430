"""Every benchmark's ``--tiny`` mode runs inside the suite, so none of them can rot.

Results go to ``tmp_path`` (never over ``bench/results/``). A benchmark module that does not
exist yet is skipped with the reason; the report writer is tested on a synthetic result.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import run_all

ROOT = Path(__file__).resolve().parents[1]


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")


@pytest.mark.e2e
@pytest.mark.parametrize("name", run_all.BENCHES)
def test_bench_tiny_mode_runs_and_writes_its_result(name: str, tmp_path: Path) -> None:
    _needs(f"bench.{name}")
    source = (ROOT / "bench" / f"{name}.py").read_text()
    if name == "worker_bench":
        try:
            import sandbox.server  # noqa: F401
        except ImportError:
            pytest.skip("the sandbox provider (sandbox.server) does not exist yet")
    output = tmp_path / f"{name}.json"
    command = [sys.executable, "-m", f"bench.{name}", "--tiny"]
    if "--output" in source:
        command += ["--output", str(output)]
    completed = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    last_line = completed.stdout.strip().splitlines()[-1]
    printed = json.loads(last_line)
    assert isinstance(printed, dict) and printed
    if output.exists():
        written = json.loads(output.read_text())
        assert written.get("tiny") in (True, None)
        for row in written.get("figures", []):
            assert {"figure", "value", "goal"} <= set(row)


def _machine(cores_busy: float, machine_ms: float, **servers: float) -> dict[str, Any]:
    return {
        "cores_busy": cores_busy,
        "machine_cpu_ms_per_item": machine_ms,
        "helpers_cpu_ms_per_item": {"cdn": 1.0, "s3 (moto)": 2.0, **servers},
    }


def _worker_result() -> dict[str, Any]:
    samples = [0.2 + i / 100 for i in range(100)]
    return {
        "command": "python -m bench.worker_bench",
        "flavour": "services",
        "throughput": {
            "items_per_second": 150.0,
            "worker_cpu_ms_per_item": 4.0,
            "concurrency": 16,
            "machine": _machine(1.7, 9.0, postgresql=0.5),
        },
        "baseline": {"cpu_ms_per_item": 2.5, "machine": _machine(1.3, 5.0)},
        "bare_celery": {"cpu_ms_per_item": 3.0, "machine": _machine(1.5, 6.5)},
        "rounds": [
            {
                "baseline_items_per_second": b,
                "bare_celery_items_per_second": bare,
                "bare_celery_ratio": None if bare is None else bare / b,
                "worker_items_per_second": w,
                "ratio": w / b,
                "worker_cpu_ms_per_item": 4.0,
                "bare_celery_cpu_ms_per_item": None if bare is None else 3.0,
                "baseline_cpu_ms_per_item": 2.5,
                "cores_busy": {
                    "baseline": 1.3,
                    "bare_celery": None if bare is None else 1.5,
                    "worker": 1.7,
                },
            }
            for b, bare, w in ((160.0, 152.0, 150.0), (170.0, None, 130.0), (150.0, 150.0, 150.0))
        ],
        "latency": {
            "events": 100,
            "rate_per_second": 100,
            "samples": samples,
            "p50_seconds": 0.7,
            "p99_seconds": 1.19,
            "goal_p99_seconds": 5.0,
        },
        "figures": [
            {
                "figure": "worker throughput (items/s)",
                "value": 150.0,
                "baseline": 160.0,
                "ratio": 0.94,
                "goal": ">= 0.8 of baseline",
                "ok": True,
            }
        ],
    }


def test_report_has_table_chart_capacity_and_names_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chart = tmp_path / "chart.png"
    monkeypatch.setattr(run_all, "CHART", chart)
    report = run_all.write_report(
        {
            "webhook_bench": {"error": "bench/webhook_bench.py does not exist yet"},
            "worker_bench": _worker_result(),
            "api_bench": {
                "command": "python -m bench.api_bench",
                "rss_growth_mb": 3.5,
                "throughput": {"value": 90, "baseline": 100, "ratio": 0.9, "goal": ">= 0.8"},
            },
        },
        tiny=False,
    )
    assert "| worker_bench | worker throughput (items/s) | 150 | 160 | 0.94 |" in report
    assert "| api_bench | throughput | 90 | 100 | 0.9 | >= 0.8 |" in report
    # Every round of the worker's throughput, not only the median one; a round without the
    # bare Celery contender (embedded flavour) says so.
    assert "| 1 | 160 | 152 (0.95) | 150 | 0.94 | 2.50, 3.00, 4.00 | 1.30, 1.50, 1.70 |" in report
    assert "| 2 | 170 | - (-) | 130 | 0.76 | 2.50, -, 4.00 | 1.30, -, 1.70 |" in report
    assert "| 3 | 150 | 150 (1.00) | 150 | 1.00 | 2.50, 3.00, 4.00 | 1.30, 1.50, 1.70 |" in report
    # Where the machine's CPU went, contender by contender; a helper one did not use is "-".
    assert "| contender | itself | cdn | postgresql | s3 (moto) | machine | cores busy |" in report
    assert "| baseline loop | 2.50 | 1.00 | - | 2.00 | 5.00 | 1.30 |" in report
    assert "| worker | 4.00 | 1.00 | 0.50 | 2.00 | 9.00 | 1.70 |" in report
    assert "| api_bench | rss_growth_mb | 3.5 |" in report
    assert "`webhook_bench`: bench/webhook_bench.py does not exist yet" in report
    assert f"![time from webhook receipt to stored]({chart.name})" in report
    assert chart.read_bytes().startswith(b"\x89PNG")
    # 4 ms per item at 60 % of a core: 150 items/s per process -> 7 processes for 1,000/s.
    assert "| 10 | 1 | 1 |" in report
    assert "| 1000 | 7 |" in report
    assert "First bottleneck" in report


def test_report_without_worker_numbers_says_capacity_is_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_all, "CHART", tmp_path / "chart.png")
    report = run_all.write_report({"worker_bench": {"error": "exit status 1"}}, tiny=True)
    assert "capacity cannot be derived" in report
    assert "No latency samples" in report
    assert "Tiny mode" in report
    assert not (tmp_path / "chart.png").exists()


def test_report_lists_every_webhook_round_behind_the_median(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_all, "CHART", tmp_path / "chart.png")
    median = {"bare_rps": 2300.0, "webhook_rps": 620.0, "ratio": 0.27}
    webhook = {
        "command": "python -m bench.webhook_bench",
        "figures": [
            {
                "figure": "signed single-image webhooks/s at 16 connections",
                "value": median["webhook_rps"],
                "baseline": median["bare_rps"],
                "ratio": median["ratio"],
                "goal": ">= 0.35 of bare Flask",
                "ok": False,
            }
        ],
        "rounds": [
            {
                **median,
                "bare_p99_ms": 40.0,
                "webhook_p99_ms": 85.25,
                "bare_cpu_us": {"server": 316, "postgresql": 0, "machine": 799},
                "webhook_cpu_us": {"server": 700, "postgresql": 248, "machine": 1972},
            },
            {"bare_rps": 2500.0, "webhook_rps": 525.0, "ratio": 0.21, "bare_p99_ms": None},
            {"bare_rps": 2000.0, "webhook_rps": 600.0, "ratio": 0.3, "webhook_p99_ms": 70.0},
        ],
    }
    report = run_all.write_report({"webhook_bench": webhook}, tiny=False)
    assert "## Webhooks, every round" in report
    assert "| 1 | 2,300 | 620 | 0.270 | 40.0, 85.2 | 316, 799 | 700, 248, 1,972 |" in report
    # Rounds from before the bench read the CPU have none to show.
    assert "| 2 | 2,500 | 525 | 0.210 | -, - | -, - | -, -, - |" in report
    assert "| 3 | 2,000 | 600 | 0.300 | -, 70.0 | -, - | -, -, - |" in report
    # One round (tiny mode) has no spread to show.
    webhook["rounds"] = webhook["rounds"][:1]
    assert "every round" not in run_all.write_report({"webhook_bench": webhook}, tiny=True)
