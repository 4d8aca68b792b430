"""S3 upload benchmark: ``S3Storage.put`` of a spooled file beside a plain ``put_object``.

``python -m bench.storage_bench [--tiny] [--output PATH]`` prints one JSON line and writes
``bench/results/storage.json``.

A 20 MiB file on local disk (random bytes, sha256 known beforehand, as the pipeline hands it
over) is uploaded to a moto server on this machine:

- ``S3Storage.put``: the service's path (checked against size and sha256 while copied to its
  own spool file, then boto3's managed transfer: a multipart upload of 8 MiB parts, each with
  the SDK's SHA256, ``IfNoneMatch`` on completion; a HEAD first, as before any multipart put);
- baseline: one ``put_object`` with the open file as its body, from a boto3 client with default
  settings (no verification, no condition, the SDK's default checksum and payload signing).

Contenders alternate for ``rounds`` rounds, each upload to a fresh key. Seconds (wall and this
process's CPU) are measured without tracing; Python's peak memory is measured by tracemalloc
on a second upload of each, since tracing slows Python code. The moto server is a separate
process, so the peak is the upload path's alone. Reported: the median seconds and the highest
peak over the rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingest.storage import S3Storage
from sandbox.stacks import S3_DUMMY_CREDENTIALS, start_moto_server, stop_moto_server

RESULTS = Path(__file__).parent / "results"
MiB = 1024 * 1024
# The bound tests/ingest/test_storage.py sets for a 20 MiB put (a quarter of it); fixed, so the
# tiny run's smaller object is held to the same few MiB rather than to a quarter of itself.
GOAL_PEAK_MIB = 5.0


@dataclass(frozen=True)
class Plan:
    object_bytes: int
    rounds: int


FULL = Plan(object_bytes=20 * MiB, rounds=5)
TINY = Plan(object_bytes=9 * MiB, rounds=1)  # still two parts: the multipart path runs


# --- measuring ----------------------------------------------------------------------------


def write_random_file(path: Path, size: int) -> str:
    """``size`` random bytes at ``path``, written 1 MiB at a time; their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(left, MiB))
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def timed(name: str, upload: Callable[[str], None]) -> tuple[float, float]:
    """Wall and CPU seconds of one upload to a fresh key."""
    key = f"{name}/timed/{uuid.uuid4().hex}"
    wall, cpu = time.perf_counter(), time.process_time()
    upload(key)
    return time.perf_counter() - wall, time.process_time() - cpu


def traced_peak(name: str, upload: Callable[[str], None]) -> int:
    """Python's peak allocation (bytes) during one upload to a fresh key."""
    key = f"{name}/traced/{uuid.uuid4().hex}"
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        upload(key)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def run(plan: Plan) -> dict[str, Any]:
    import boto3

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        os.environ.pop(name, None)
    os.environ.update(S3_DUMMY_CREDENTIALS)
    with ExitStack() as stack:
        moto, endpoint_url = start_moto_server()
        stack.callback(stop_moto_server, moto)
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="storage-bench-")))
        source = workdir / "spooled.bin"
        sha256 = write_random_file(source, plan.object_bytes)
        bucket = f"storage-bench-{uuid.uuid4().hex[:12]}"

        storage = S3Storage(bucket, endpoint_url=endpoint_url)
        stack.callback(storage.client.close)
        storage.ensure_bucket()
        plain = boto3.client("s3", endpoint_url=endpoint_url)
        stack.callback(plain.close)

        def new_put(key: str) -> None:
            with source.open("rb") as body:
                storage.put(
                    key, body, size=plan.object_bytes, sha256=sha256, content_type="video/mp4"
                )

        def baseline_put(key: str) -> None:
            with source.open("rb") as body:
                plain.put_object(Bucket=bucket, Key=key, Body=body, ContentType="video/mp4")

        contenders = {"put": new_put, "baseline": baseline_put}
        for upload in contenders.values():
            upload(f"warm-up/{uuid.uuid4().hex}")  # connections, lazy imports
        rounds: list[dict[str, Any]] = []
        for _ in range(plan.rounds):
            row: dict[str, Any] = {}
            for name, upload in contenders.items():
                wall, cpu = timed(name, upload)
                peak = traced_peak(name, upload)
                row[name] = {"seconds": wall, "cpu_seconds": cpu, "peak_bytes": peak}
            rounds.append(row)
        # What the service stored is what it was given, read back through its own API.
        stored = [storage.head(key) for key in _keys(storage, bucket, "put/")]
        assert len(stored) == 2 * plan.rounds
        assert {(o.size, o.sha256) for o in stored} == {(plan.object_bytes, sha256)}
    return report(plan, rounds)


def _keys(storage: S3Storage, bucket: str, prefix: str) -> list[str]:
    listing = storage.client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for obj in listing.get("Contents", [])]


def report(plan: Plan, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    def median(name: str, field: str) -> float:
        return float(statistics.median(r[name][field] for r in rounds))

    def peak_mib(name: str) -> float:
        return float(max(r[name]["peak_bytes"] for r in rounds)) / MiB

    mib = plan.object_bytes / MiB
    put_peak, base_peak = peak_mib("put"), peak_mib("baseline")
    put_s, base_s = median("put", "seconds"), median("baseline", "seconds")
    put_cpu, base_cpu = median("put", "cpu_seconds"), median("baseline", "cpu_seconds")

    def ratio(value: float, baseline: float) -> float | None:
        return round(value / baseline, 2) if baseline else None

    figures = [
        {
            "figure": f"S3Storage.put of a {mib:.0f} MiB spooled file: Python peak (MiB)",
            "value": round(put_peak, 2),
            "baseline": round(base_peak, 2),
            "ratio": ratio(put_peak, base_peak),
            "goal": f"< {GOAL_PEAK_MIB:.0f} MiB (a quarter of 20 MiB)",
            "ok": put_peak < GOAL_PEAK_MIB,
        },
        {
            "figure": f"S3Storage.put of a {mib:.0f} MiB spooled file to moto (s)",
            "value": round(put_s, 3),
            "baseline": round(base_s, 3),
            "ratio": ratio(put_s, base_s),
            "goal": "reported beside one plain put_object",
            "ok": None,
        },
        {
            "figure": f"S3Storage.put of a {mib:.0f} MiB spooled file: CPU of this process (s)",
            "value": round(put_cpu, 3),
            "baseline": round(base_cpu, 3),
            "ratio": ratio(put_cpu, base_cpu),
            "goal": "reported",
            "ok": None,
        },
    ]
    return {
        "bench": "storage",
        "tiny": plan is TINY,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "plan": plan.__dict__,
        "figures": figures,
        "rounds": [
            {
                name: {
                    "seconds": round(values["seconds"], 3),
                    "cpu_seconds": round(values["cpu_seconds"], 3),
                    "peak_mib": round(values["peak_bytes"] / MiB, 2),
                }
                for name, values in row.items()
            }
            for row in rounds
        ],
        "ok": figures[0]["ok"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tiny", action="store_true", help="one small round: smoke test only")
    parser.add_argument("--output", type=Path, default=RESULTS / "storage.json")
    args = parser.parse_args(argv)
    result = run(TINY if args.tiny else FULL)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
