"""Two API replicas over one catalog and one bucket, each behind a killable loopback forwarder."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import NamedTuple

import pytest

from tests.client._tcpproxy import TcpProxy
from tests.conftest import LiveServer
from weightstore.context import Context


class Replica(NamedTuple):
    server: LiveServer
    proxy: TcpProxy

    @property
    def url(self) -> str:
        return self.proxy.url


@pytest.fixture
def replicas(ctx: Context) -> Iterator[list[Replica]]:
    """Two uvicorn replicas (``create_app`` on copies of ``ctx``: same engine, store and clock).
    Clients reach each through a ``TcpProxy``: killing the proxy cuts every connection at once,
    what a client sees when a replica is killed with SIGKILL."""
    out = []
    for _ in range(2):
        server = LiveServer(dataclasses.replace(ctx)).start()
        out.append(Replica(server, TcpProxy(server.port)))
    yield out
    for r in out:
        r.proxy.kill()
        r.server.stop()
