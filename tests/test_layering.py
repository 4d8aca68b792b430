"""The core knows nothing of its adapters: ingest/ never imports Flask, Celery or them."""

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "ingest"
FORBIDDEN = {"flask", "werkzeug", "celery", "kombu", "webhook", "tasks", "cli", "sandbox"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize(
    "module", sorted(CORE.rglob("*.py")), ids=lambda p: str(p.relative_to(CORE))
)
def test_core_module_imports_no_adapter(module: Path) -> None:
    assert imported_roots(module) & FORBIDDEN == set()


def test_the_cli_does_not_import_prometheus_client_before_a_process_configures_it() -> None:
    """prometheus_client picks its multi-process mode when first imported: `ingest web` and
    `ingest worker` set PROMETHEUS_MULTIPROC_DIR first, so importing the CLI must not."""
    import subprocess
    import sys

    code = "import sys, cli.main; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _core_imports(path: Path) -> set[str]:
    """The ``ingest.*`` modules a core module imports (``from ingest import x`` counts x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("ingest."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "ingest":
                names.update(f"ingest.{a.name}" for a in node.names)
            elif node.module.startswith("ingest."):
                names.add(node.module)
    return names


def test_egress_does_not_import_the_provider_clients_that_sit_on_it() -> None:
    # The errors both raise live in ingest.provider_errors: no import cycle between them.
    assert "ingest.providers" not in _core_imports(CORE / "egress.py")
    assert "ingest.egress" in _core_imports(CORE / "providers.py")
