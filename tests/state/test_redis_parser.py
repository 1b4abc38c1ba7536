"""RedisState's connections parse replies with hiredis (pyproject pins it for its CPU cost).

redis-py silently falls back to its pure-Python parser when ``hiredis`` cannot be imported
(a broken or missing wheel): nothing fails, every Redis call just costs ~17% more client
instructions. This makes that fallback visible.
"""

from __future__ import annotations

import secrets
from typing import Any

import redis.utils
from redis._parsers import _AsyncHiredisParser

from gateway.state.redis import RedisState
from tests.support.redis_server import RedisServer


def test_hiredis_is_importable_and_seen_by_redis_py() -> None:
    import hiredis

    assert redis.utils.HIREDIS_AVAILABLE is True
    assert hiredis.__version__ == "3.5.0"


async def test_redis_state_connections_use_the_hiredis_parser(redis_server: RedisServer) -> None:
    state = RedisState.from_url(redis_server.url, key_prefix=f"p{secrets.token_hex(4)}", op_timeout_s=1.0)
    try:
        await state.ping()
        client: Any = state._client
        connections = list(client.connection_pool._available_connections)
        assert connections, "the ping's connection went back to the pool"
        assert all(isinstance(c._parser, _AsyncHiredisParser) for c in connections)
        # Replies still come back as the RESP2 types the scripts expect.
        assert await client.eval("return {1, 'two', 3}", 0) == [1, b"two", 3]
    finally:
        await state.close()
