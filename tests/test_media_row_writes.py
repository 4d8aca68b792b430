"""Every write to ``media_items`` is a transition of ingest/media_rows.py (the row's state
machine); other modules call it. Tests and benchmarks may build rows directly (factories).

Approximate by design, read from the syntax tree: a Core ``insert``/``update``/``delete``
of ``MediaItem`` (or its table), a ``MediaItem(...)`` object built to be added, and an
attribute of a row loaded as ``MediaItem`` assigned to be flushed.
"""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.models import MediaItem

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ingest", "webhook", "tasks", "cli", "sandbox")
STATE_MACHINE = ROOT / "ingest" / "media_rows.py"
# Schema changes write the table on purpose, outside any state.
EXEMPT = ("ingest/migrations/",)

MODEL = "MediaItem"
WRITE_CALLS = {"insert", "update", "delete"}
# ORM calls that write the objects or mappings given to them.
ORM_WRITE_CALLS = {"bulk_insert_mappings", "bulk_update_mappings", "bulk_save_objects", "merge"}
COLUMNS = frozenset(column.key for column in MediaItem.__table__.columns)
RAW_SQL = ("insert into media_items", "update media_items", "delete from media_items")


def _is_table(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "__table__"
        and isinstance(node.value, ast.Name)
        and node.value.id == MODEL
    )


def _table_names(tree: ast.AST) -> set[str]:
    """Names bound to ``MediaItem.__table__`` (``table = MediaItem.__table__``)."""
    return {
        name
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and _is_table(node.value)
        for target in node.targets
        for name in _bound_names(target)
    }


def _call_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _loads_model(node: ast.AST) -> bool:
    """An expression that yields ORM objects of MediaItem: ``select(MediaItem)``,
    ``session.get(MediaItem, id)``, ``session.query(MediaItem)``."""
    return any(
        isinstance(sub, ast.Call)
        and _call_name(sub) in {"select", "get", "query", "get_one"}
        and any(isinstance(arg, ast.Name) and arg.id == MODEL for arg in sub.args)
        for sub in ast.walk(node)
    )


def _bound_names(target: ast.AST) -> Iterator[str]:
    for sub in ast.walk(target):
        if isinstance(sub, ast.Name):
            yield sub.id


def _loaded_rows(tree: ast.AST) -> set[str]:
    """Names bound to MediaItem objects (assignment or loop target), by any function."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and _loads_model(node.value):
            for target in node.targets:
                names.update(_bound_names(target))
        elif isinstance(node, ast.AnnAssign | ast.NamedExpr) and node.value is not None:
            if _loads_model(node.value):
                names.update(_bound_names(node.target))
        elif isinstance(node, ast.For | ast.comprehension) and _loads_model(node.iter):
            names.update(_bound_names(node.target))
    return names


def row_writes(source: str, filename: str = "<source>") -> list[str]:
    """Where this source writes a media row, as ``line: what``."""
    tree = ast.parse(source, filename=filename)
    rows = _loaded_rows(tree)
    model_names = {MODEL} | _table_names(tree)

    def _names_model(node: ast.AST) -> bool:
        """``MediaItem``, its table, or a name bound to the table."""
        return _is_table(node) or (isinstance(node, ast.Name) and node.id in model_names)

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _call_name(node)
            if name in WRITE_CALLS | ORM_WRITE_CALLS and any(map(_names_model, node.args)):
                found.append(f"{node.lineno}: {name}({MODEL})")
            elif (
                name in WRITE_CALLS
                and isinstance(node.func, ast.Attribute)
                and _names_model(node.func.value)
            ):
                found.append(f"{node.lineno}: {MODEL}.__table__.{name}()")
            elif name == MODEL:
                found.append(f"{node.lineno}: {MODEL}(...) built")
            elif (
                name in {"setattr", "delete", "merge"}
                and node.args
                and set(_bound_names(node.args[0])) & rows
            ):
                found.append(f"{node.lineno}: {name} on a loaded {MODEL}")
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if (
                        isinstance(sub, ast.Attribute)
                        and sub.attr in COLUMNS
                        and isinstance(sub.value, ast.Name)
                        and sub.value.id in rows
                    ):
                        found.append(f"{node.lineno}: {sub.value.id}.{sub.attr} assigned")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = " ".join(node.value.lower().split())
            if any(statement in text for statement in RAW_SQL):
                found.append(f"{node.lineno}: raw SQL writing media_items")
    return found


def _sources() -> list[Path]:
    return sorted(
        path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if path != STATE_MACHINE and not str(path.relative_to(ROOT)).startswith(EXEMPT)
    )


@pytest.mark.parametrize("module", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_only_the_state_machine_writes_media_rows(module: Path) -> None:
    writes = row_writes(module.read_text(), str(module))
    assert writes == [], f"{module.relative_to(ROOT)} writes media_items; use ingest.media_rows"


def test_the_state_machine_is_seen_writing() -> None:
    """The detector recognises the real statements (else the walk above proves nothing)."""
    writes = " ".join(row_writes(STATE_MACHINE.read_text()))
    for statement in ("update(MediaItem)", "delete(MediaItem)", "insert(MediaItem)"):
        assert statement in writes


@pytest.mark.parametrize(
    "source",
    [
        "update(MediaItem).values(state='stored')",
        "sa.delete(MediaItem).where(MediaItem.id == 1)",
        "postgresql.insert(MediaItem.__table__)",
        "table = MediaItem.__table__\nsqlite.insert(table).on_conflict_do_nothing()",
        "MediaItem.__table__.update()",
        "session.add(MediaItem(message_id='m'))",
        "session.bulk_update_mappings(MediaItem, rows)",
        "conn.execute(text('UPDATE media_items SET state = :s'))",
        "item = session.get(MediaItem, 1)\nitem.state = 'erased'",
        "item = session.execute(select(MediaItem)).scalar_one()\nitem.caption = None",
        "for row in session.scalars(select(MediaItem)):\n    row.attempts += 1",
        "item = session.get(MediaItem, 1)\nsetattr(item, 'state', 'erased')",
        "item = session.get(MediaItem, 1)\nsession.delete(item)",
    ],
)
def test_the_detector_finds_a_write(source: str) -> None:
    assert row_writes(source) != []


@pytest.mark.parametrize(
    "source",
    [
        "select(MediaItem.id).where(MediaItem.state == 'stored')",
        "update(Instance).values(connected=False)",
        "item = session.get(MediaItem, 1)\nkeys = {item.storage_key}",
        "media_rows.erase(session, 1, by='x', now=now)",
        "instance = session.get(Instance, 1)\ninstance.connected = False",
    ],
)
def test_the_detector_passes_reads_and_other_tables(source: str) -> None:
    assert row_writes(source) == []
