"""The rate limiter's Redis client (llm_proxy/resp.py): wire format, pipelining, script
loading, URLs. Against the real Redis where a server is involved."""

from __future__ import annotations

import asyncio

import pytest
import redis

from llm_proxy.resp import RedisError, RedisURL, Script, ScriptClient, _Protocol, pack


def test_replies_cut_anywhere_resolve_their_commands_in_order():
    async def scenario() -> list[object]:
        protocol = _Protocol()
        protocol.transport = _NullTransport()
        first = protocol.send(pack("EVALSHA", "x", 0))
        second = protocol.send(pack("EVALSHA", "y", 0))
        third = protocol.send(pack("PING"))
        replies = b"*3\r\n:1\r\n:-2\r\n$3\r\nabc\r\n-NOSCRIPT no such script\r\n+PONG\r\n"
        for i in range(len(replies)):  # one byte at a time
            protocol.data_received(replies[i : i + 1])
        with pytest.raises(RedisError, match="NOSCRIPT"):
            await second
        return [await first, await third, bytes(protocol.buffer)]

    assert asyncio.run(scenario()) == [[1, -2, b"abc"], "PONG", b""]


def test_a_command_given_up_on_does_not_take_the_next_ones_reply():
    async def scenario() -> object:
        protocol = _Protocol()
        protocol.transport = _NullTransport()
        abandoned = protocol.send(pack("PING"))
        abandoned.cancel()  # its caller timed out
        wanted = protocol.send(pack("PING"))
        protocol.data_received(b":1\r\n:2\r\n")
        return await wanted

    assert asyncio.run(scenario()) == 2


def test_urls():
    assert RedisURL.parse("redis://:s3cret@cache:6380/8") == RedisURL(
        host="cache", port=6380, db=8, password="s3cret"
    )
    assert RedisURL.parse("rediss://user:pw@h") == RedisURL(
        host="h", username="user", password="pw", tls=True
    )
    assert RedisURL.parse("unix:///run/redis.sock?db=3") == RedisURL(path="/run/redis.sock", db=3)
    with pytest.raises(ValueError, match="redis://"):
        RedisURL.parse("http://h")


def test_a_script_the_server_does_not_know_is_loaded_and_run(redis_url):
    redis.Redis.from_url(redis_url).script_flush()
    script = Script("return {tonumber(ARGV[1]) + 1, redis.call('INCRBY', KEYS[1], 5)}")

    async def run_twice() -> list[object]:
        client = ScriptClient(redis_url, timeout_s=2)
        return [await client.evalsha(script, ["otari:test:k"], [41]) for _ in range(2)]

    # The database of the URL (SELECT) holds the key.
    assert asyncio.run(run_twice()) == [[42, 5], [42, 10]]
    assert redis.Redis.from_url(redis_url).get("otari:test:k") == b"10"


class _NullTransport:
    def write(self, data: bytes) -> None:
        pass
