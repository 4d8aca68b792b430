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
