"""The service ``ingest demo`` starts when none answers at ``--url``: web, worker and beat
subprocesses on the embedded defaults in a temporary ``var`` directory, wired to a sandbox
started in this process (or the one ``--sandbox`` names).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from cli.demo_checks import DemoError, find_sandbox, media_hosts_setting
from ingest import migrate
from ingest.settings import Settings, load_settings
from sandbox.processes import ProcessError, ProcessGroup

# --- the embedded service ----------------------------------------------------------------


@contextmanager
def embedded_service(env: dict[str, str], var_dir: Path) -> Iterator[str]:
    """web + worker + beat on the embedded defaults under ``var_dir``; yields the base URL."""
    try:
        group = ProcessGroup(log_dir=var_dir, env={**env, "INGEST_VAR_DIR": str(var_dir)})
    except ProcessError:
        raise DemoError(
            "cannot find the `ingest` executable to start the embedded service"
        ) from None
    try:
        try:
            web = group.web()
            group.worker(concurrency=8)
            group.beat()
        except ProcessError as exc:
            raise DemoError(f"the embedded service did not start: {exc}") from None
        assert web.base_url is not None  # set by group.web()
        yield web.base_url
    finally:
        group.stop_all()


@contextmanager
def in_process_sandbox() -> Iterator[str]:
    """Start the sandbox provider on a free port in a background thread; yield its root URL."""
    try:
        from sandbox.server import start_sandbox
    except ImportError as exc:
        raise DemoError(f"the sandbox provider is not available: {exc}") from None
    server = start_sandbox()
    try:
        yield str(server.base_url).rstrip("/")
    finally:
        server.stop()


def start_embedded(
    stack: ExitStack,
    url: str,
    sandbox_url: str | None,
    keep: bool,
    note: Callable[[str], None],
) -> tuple[Settings, str, str, Path]:
    """The embedded service, in a new temporary ``var`` directory (removed with ``stack``
    unless ``keep``), on the sandbox at ``sandbox_url`` or one started here; its settings
    (to reach its database), URL, sandbox root and ``var`` directory. Stopped with ``stack``."""
    sandbox_root = find_sandbox(sandbox_url, "", {}) if sandbox_url else None
    if sandbox_root is None:
        sandbox_root = stack.enter_context(in_process_sandbox())
    var_dir = Path(tempfile.mkdtemp(prefix="ingest-demo-"))
    if not keep:
        stack.callback(shutil.rmtree, var_dir, ignore_errors=True)
    env = {
        "INGEST_GRAPH_URL": f"{sandbox_root}/v21.0",
        "INGEST_D360_URL": f"{sandbox_root}/d360",
        "INGEST_MEDIA_HOSTS": media_hosts_setting(sandbox_root),
        "INGEST_RECONCILE_INTERVAL_SECONDS": "5",
    }
    # Explicit values: the demo's own INGEST_* variables name a service that is not
    # running, and must not steer it away from the embedded one it starts.
    settings = load_settings(
        var_dir=var_dir,
        database_url="",
        broker_url="",
        storage_url="",
        graph_url=env["INGEST_GRAPH_URL"],
        d360_url=env["INGEST_D360_URL"],
    )
    settings.ensure_var_dir()
    migrate.upgrade(settings.database_url)
    note(f"no service at {url}: starting the embedded one in {var_dir}")
    url = stack.enter_context(embedded_service(env, var_dir))
    return settings, url, sandbox_root, var_dir
