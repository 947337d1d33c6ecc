"""The open-file limit shared between inbound connections, GPU requests and the rest (dispatcher/fds.py)."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher import fds
from dispatcher.gpus.gpu_client import GpuClient


@pytest.mark.parametrize(
    ("soft", "outbound", "inbound"),
    [
        (256, 64, 64),  # an outside attack's limit: 16 inbound connections before, unbounded outbound
        (1024, 256, 640),
        (65536, 4096, 65536 - 4096 - fds.OTHER),
        (64, 16, 16),  # absurdly low: each side keeps a minimum
    ],
)
def test_each_side_keeps_to_its_share(soft, outbound, inbound):
    assert (fds.outbound(soft), fds.inbound(soft)) == (outbound, inbound)
    if soft >= 256:  # together they never exceed the limit
        assert fds.outbound(soft) + fds.inbound(soft) + fds.OTHER <= soft


def test_the_gpu_client_pool_is_bounded_by_the_outbound_share():
    async def scenario() -> int:
        client = GpuClient(bearer_token="t", connect_timeout=1, request_timeout=1)
        await client.start()
        try:
            assert client._session is not None
            return int(client._session.connector.limit)  # type: ignore[union-attr]
        finally:
            await client.close()

    assert asyncio.run(scenario()) == fds.outbound(fds.soft_limit())
