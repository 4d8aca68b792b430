"""kombu's Redis transport, with one client per channel for its acknowledgement bookkeeping.

With ``task_acks_late`` every delivered message costs two bookkeeping round trips (recorded
as unacked on delivery, removed on ack). For each of them kombu's ``Channel.conn_or_acquire``
builds a brand-new ``redis.Redis`` object on the channel's pool and drops it afterwards;
redis-py's constructor fills a table of about a hundred response callbacks, and in the
worker benchmark those throwaway clients were about 5% of the worker's CPU per item.

A Redis client is a thin, thread-safe handle on its connection pool (pipelines are still
created per use), so one per channel serves every caller. It is rebuilt whenever the channel
replaces its pool (after a fork, or when it is closed). Nothing else changes: same keys, same
commands, same delivery guarantees. ``tasks.celery_app`` selects this transport for
``redis://`` broker URLs; ``rediss://`` keeps kombu's, which turns TLS on by its name.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

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


class Transport(kombu_redis.Transport):
    Channel = Channel


# What ``broker_transport`` names (kombu resolves "module:attribute").
TRANSPORT = f"{__name__}:Transport"
