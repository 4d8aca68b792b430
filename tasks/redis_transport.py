"""kombu's Redis transport, with one client per channel for its acknowledgement bookkeeping,
and channels that outlive their connection without breaking the worker (docs/RELIABILITY.md).

One client per channel
----------------------
With ``task_acks_late`` every delivered message costs two bookkeeping round trips (recorded
as unacked on delivery, removed on ack). For each of them kombu's ``Channel.conn_or_acquire``
builds a brand-new ``redis.Redis`` object on the channel's pool and drops it afterwards;
redis-py's constructor fills a table of about a hundred response callbacks, and in the
worker benchmark those throwaway clients were a visible share of the worker's CPU per item
(docs/PERFORMANCE.md).

A Redis client is a thin, thread-safe handle on its connection pool (pipelines are still
created per use), so one per channel serves every caller. It is rebuilt whenever the channel
replaces its pool (after a fork, or when it is closed). Nothing else changes: same keys, same
commands, same delivery guarantees. ``tasks.celery_app`` selects this transport for
``redis://`` broker URLs; ``rediss://`` keeps kombu's, which turns TLS on by its name.

Broker outages: a channel outlives its connection
-------------------------------------------------
Fault injection (docs/RELIABILITY.md) killed Redis under a worker with downloads in flight;
every worker process logged ``Connection to broker lost``, ``Restoring N unacknowledged
message(s)`` and then died with ``Unrecoverable error: AttributeError("'NoneType' object has
no attribute 'hostname'")``. Reproduced with kombu's own transport too
(tests/tasks/test_broker_outage.py), on kombu 5.7.0 with Celery 5.7.0. The sequence, when
the loss is handled while a BRPOP is outstanding on the task channel (the usual case:
prefetch is rarely full) and messages are unacked:

1. Celery's ``Consumer.on_connection_error_after_connected`` calls ``connection.collect()``.
   kombu closes the default (task) channel first; its ``Channel.close`` starts by reading the
   outstanding BRPOP reply (kombu #1733), which raises ``ConnectionError`` on the dead socket
   before anything is closed. ``maybe_close_channel`` swallows it: the channel stays open
   with its unacked messages.
2. ``Transport.close_connection`` then closes the other channels; the first one, the
   remote-control (pidbox) channel, fails deleting its auto-delete fanout queue on the dead
   server, which aborts the loop before it reaches the task channel again.
3. ``collect`` detaches the transport (``transport.client = None``).
4. Celery 5.7 then also calls ``connection.close()`` on the broken connection (celery #10242,
   GH-9705, new in 5.7.0). That closes the still-open task channel: its QoS restores the
   unacked messages, which needs a Redis pool, which kombu builds from
   ``self.connection.client``: ``None.hostname``. ``ignore_errors`` only ignores connection
   errors, so the ``AttributeError`` escapes the reconnect path and Celery stops the consumer.

The same lookup fails for the ack of a task that finished after the loss (its channel was
closed: ``channel.connection`` is None), also outside what ``ack_log_error`` catches. kombu
has had reports of this class for years (celery/kombu#582 and #970: ``hostname`` of a closed
connection, then in a gc finaliser where it was harmless); Celery 5.7's explicit close
made it fatal. No version avoids it: kombu's main branch (newest snapshot, after 5.6.2) and
the installed 5.7.0 both build the pool from the detached transport, and Celery 5.6, which
does not close the collected connection, leaves the error to a gc finaliser but lacks the
GH-9705 fixes (the reconnect path hanging on a dead socket: celery #10242 and #10570).

The fix, in ``Channel._connparams`` (every pool is built from it): a channel remembers the
address its synchronous pool was opened with and, once its transport is detached, keeps
using it for what it still owes the server, the restore at close and the acks of tasks
that finish later. With Redis down these fail as the ``ConnectionError`` they are, which
kombu and Celery already handle as a lost connection everywhere (``maybe_close_channel``,
``ignore_errors``, ``ack_log_error``), and the consumer reconnects; with Redis back the
acks succeed, so a task that finished across an outage is not run again after the
visibility timeout. A detached channel never consumes again: it gets no asynchronous
(BRPOP) pool, and one that never opened a synchronous pool raises ``ConnectionError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

DETACHED = "the channel's broker connection is closed (lost or shut down)"


class Channel(kombu_redis.Channel):
    _shared_client: Any = None
    # The synchronous pool's parameters, kept for when the transport is detached.
    _opened_with: dict[str, Any] | None = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:
            # Two threads may both get here; each builds a client and the last one is kept.
            shared = self._shared_client = self._create_client()
        yield shared

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        # Every pool is built from here, and kombu reads the server's address from the
        # transport's client, which kombu sets to None once the connection is collected or
        # closed (see the module docstring). A channel may still owe that server its
        # bookkeeping then (restore at close, acks of tasks that finished): it keeps the
        # address it was opened with. It never consumes again: no asynchronous (BRPOP) pool.
        transport = self.connection
        if transport is not None and transport.client is not None:
            params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
            if not asynchronous:
                self._opened_with = params
            return params
        if asynchronous or self._opened_with is None:
            raise RedisConnectionError(DETACHED)
        return dict(self._opened_with)


class Transport(kombu_redis.Transport):
    Channel = Channel


# What ``broker_transport`` names (kombu resolves "module:attribute").
TRANSPORT = f"{__name__}:Transport"
