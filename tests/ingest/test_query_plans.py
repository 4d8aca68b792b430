"""The worker's hot statements on ``media_items`` do work in proportion to the rows they
touch, not to the backlog, whatever the planner's statistics say.

Production meets stale statistics as a matter of course: a table of millions of stored rows
is analysed once a tenth of it changes, so a burst of tens of thousands of pending rows is
planned with statistics that say there are none. Each test here takes statistics of a quiet
table (every row finished or woken), adds a backlog, and reads the plan PostgreSQL actually
ran (``EXPLAIN ANALYZE`` of the statement as the code sends it, rolled back).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, event
from sqlalchemy.orm import Session, sessionmaker

from ingest import media_rows
from ingest.db import engine_of, session_scope
from ingest.models import utcnow
from tests.factories import make_instance

pytestmark = pytest.mark.postgres

QUIET_ROWS = 1000
BACKLOG_ROWS = 2000


@pytest.fixture
def connection(database_url: str, sessions: sessionmaker[Session]) -> Iterator[Connection]:
    if not database_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL planner question")
    with engine_of(sessions).connect() as conn:
        yield conn
        conn.rollback()


@pytest.fixture
def instance_id(sessions: sessionmaker[Session]) -> int:
    with session_scope(sessions) as session:
        return make_instance(session).id


def test_the_relay_picks_its_rows_once(connection: Connection, instance_id: int) -> None:
    """Written as ``id IN (subquery)``, the plan ran the pass's ``LIMIT .. FOR UPDATE SKIP
    LOCKED`` subquery again for every unwoken row: a pass over 2,500 rows took 7 s, holding
    the locks the claims waited on."""
    _insert_rows(connection, instance_id, 0, QUIET_ROWS, state="pending", woken=True)
    connection.exec_driver_sql("ANALYZE media_items")
    _insert_rows(connection, instance_id, QUIET_ROWS, BACKLOG_ROWS, state="pending", woken=False)

    plan = _explain(connection, lambda: media_rows.take_unwoken(connection, utcnow(), 500))

    pickings = [node for node in _nodes(plan) if node["Node Type"] == "LockRows"]
    assert pickings, "the pass locks the rows it takes"
    assert [node["Actual Loops"] for node in pickings] == [1] * len(pickings)
    assert plan["Actual Rows"] == 500


def test_a_claim_reads_only_the_rows_it_names(connection: Connection, instance_id: int) -> None:
    """The claim names its rows by id. Planned on the ``(state, next_attempt_at)`` index
    instead, it read every due row of the backlog to find its sixteen."""
    _insert_rows(connection, instance_id, 0, QUIET_ROWS, state="stored", woken=True)
    connection.exec_driver_sql("ANALYZE media_items")
    first_id = _insert_rows(
        connection, instance_id, QUIET_ROWS, BACKLOG_ROWS, state="pending", woken=True
    )
    wanted = list(range(first_id, first_id + 16))
    now = utcnow()

    plan = _explain(
        connection,
        lambda: media_rows.claim(
            connection,
            wanted,
            owner="test",
            now=now,
            lease_until=now + timedelta(minutes=15),
            max_lease_losses=3,
        ),
    )

    assert plan["Actual Rows"] == len(wanted)
    read = sum(
        (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"]
        for node in _nodes(plan)
        if _reads_media_items(node)
    )
    # An index scan and its heap visit count once each: twice the rows, and a little slack.
    assert read <= 3 * len(wanted)


# --- helpers ---------------------------------------------------------------------------


def _insert_rows(
    connection: Connection, instance_id: int, first: int, count: int, *, state: str, woken: bool
) -> int:
    """``count`` due rows in ``state``; returns the first one's id."""
    return int(
        connection.exec_driver_sql(
            "INSERT INTO media_items (instance_id, message_id, media_type, received_at,"
            " expires_at, state, attempts, lease_losses, next_attempt_at, enqueued_at,"
            " updated_at, voice, animated, over_send_limit)"
            " SELECT %(instance)s, 'wamid.' || n, 'image', now(), now() + interval '7 days',"
            " %(state)s, 0, 0, now() - interval '1 second',"
            " CASE WHEN %(woken)s THEN now() END, now(), false, false, false"
            " FROM generate_series(%(first)s::integer, %(last)s::integer) AS n"
            " RETURNING id",
            {
                "instance": instance_id,
                "state": state,
                "woken": woken,
                "first": first,
                "last": first + count - 1,
            },
        )
        .scalars()
        .first()
    )


def _explain(connection: Connection, run: Callable[[], object]) -> dict[str, Any]:
    """The plan PostgreSQL ran for the one statement ``run`` sends on ``connection``."""
    captured: list[Any] = []

    def explain(
        _conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any
    ) -> tuple[str, Any]:
        return "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters

    def keep(_conn: Any, cursor: Any, *_: Any) -> None:
        captured.append(cursor.fetchone()[0])

    event.listen(connection, "before_cursor_execute", explain, retval=True)
    event.listen(connection, "after_cursor_execute", keep)
    try:
        run()  # sees no rows: the plan was read in their place
    finally:
        event.remove(connection, "before_cursor_execute", explain)
        event.remove(connection, "after_cursor_execute", keep)
    assert len(captured) == 1, "one statement"
    (document,) = captured[0]
    plan: dict[str, Any] = document["Plan"]
    return plan


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


def _reads_media_items(node: dict[str, Any]) -> bool:
    """A scan of the table or of one of its indexes (a bitmap index scan names no table)."""
    if not node["Node Type"].endswith("Scan"):
        return False
    index = str(node.get("Index Name", ""))
    return node.get("Relation Name") == "media_items" or "_media_items" in index
