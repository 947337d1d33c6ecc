"""The lean client a job's POST to an ``http://`` GPU goes through (dispatcher/gpus/lean_http.py), against
GPU services that misbehave at the byte level: real servers on loopback, scripted one connection at a time.

What must hold: every answer is judged as aiohttp's was (the differential test runs both clients on the same
answers); a request the GPU may have (sent, then the connection dropped, garbage, silence) is UNKNOWN and
never retried by the client; one never sent is RETRY or NOT_SENT; a wait for a free connection of the pool is
no failure; keep-alive connections are reused, and one that cannot be (cut answer, ``Connection: close``) is
not.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest

from dispatcher.gpus.gpu_client import Answer, GpuClient, Verdict
from dispatcher.gpus.lean_http import ConnectFailed, LeanPool, NoAnswer
from dispatcher.gpus.lean_target import target

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawGpu:
    """A TCP server running ``script(reader, writer, connection_number)`` for each connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body) of each request read
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            await self.script(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await reader.readexactly(length)
        self.requests.append((head, body))
        return body


@contextlib.asynccontextmanager
async def raw_gpu(script: Script, path: str = "/infer") -> AsyncIterator[RawGpu]:
    gpu = RawGpu(script)
    server = await asyncio.start_server(gpu._serve, "127.0.0.1", 0)
    gpu.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}{path}"
    try:
        yield gpu
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


def answer_bytes(status: int, body: bytes, *, extra: str = "", length: bool = True) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{extra}"
    if length:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


ACCEPTED = answer_bytes(202, b'{"status": "accepted"}')


def keep_answering(gpu_of: Callable[[], RawGpu], reply: bytes = ACCEPTED) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await gpu_of().read_request(reader)
            writer.write(reply)
            await writer.drain()

    return script


async def client(
    *, connect: float = 2, read: float = 5, lean: bool = True, max_answer_bytes: int = 1 << 20
) -> GpuClient:
    c = GpuClient(
        bearer_token="tok",
        connect_timeout=connect,
        request_timeout=read,
        max_answer_bytes=max_answer_bytes,
        lean=lean,
    )
    await c.start()
    return c


JOB = {"task_id": "t1", "input": {"prompt": "p"}}


async def send_once(url: str, **kw: Any) -> Answer:
    """``JOB`` to ``url`` through a client of its own (``client``'s keywords)."""
    c = await client(**kw)
    try:
        return await c.send(url, JOB)
    finally:
        await c.close()


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_the_request_is_what_a_gpu_service_expects_and_its_connection_is_kept():
    async def scenario() -> None:
        holder: list[RawGpu] = []
        async with raw_gpu(keep_answering(lambda: holder[0]), path="/v1/infer?model=a%20b") as gpu:
            holder.append(gpu)
            c = await client()
            try:
                answers = [await c.send(gpu.url, JOB) for _ in range(20)]
            finally:
                await c.close()
        assert {a.verdict for a in answers} == {Verdict.ACCEPTED}
        # THEN one keep-alive connection carried all twenty
        assert gpu.connections == 1
        head, body = gpu.requests[0]
        lines = head.decode().split("\r\n")
        assert lines[0] == "POST /v1/infer?model=a%20b HTTP/1.1"
        port = gpu.url.split(":")[2].split("/")[0]
        assert f"Host: 127.0.0.1:{port}" in lines
        assert "Authorization: Bearer tok" in lines
        assert "Content-Type: application/json" in lines
        assert not any(line.lower().startswith("accept-encoding") for line in lines)  # never a gzip answer
        assert orjson.loads(body) == JOB

    run(scenario())


# Each answer, the bytes a GPU service writes; the test compares the lean client's verdict with aiohttp's.
ANSWERS = {
    "202 accepted": ACCEPTED,
    "200 finished": answer_bytes(200, b'{"status": "finished", "result": {"y": 1}}'),
    "200 failed, retry": answer_bytes(200, b'{"status": "failed", "error": "oom", "retry": true}'),
    "200 empty": answer_bytes(200, b""),
    "204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "400": answer_bytes(400, b'{"detail": "bad input"}'),
    "404": answer_bytes(404, b"Not Found"),
    "422": answer_bytes(422, b'{"detail": [1]}'),
    "429": answer_bytes(429, b""),
    "500": answer_bytes(500, b"boom"),
    "501": answer_bytes(501, b""),
    "503": answer_bytes(503, b"busy"),
    "302": answer_bytes(302, b"", extra="Location: /elsewhere\r\n"),
    "307 to another origin": answer_bytes(307, b"", extra="Location: http://other.invalid:1/x\r\n"),
    "307 malformed": answer_bytes(307, b"", extra="Location: http://[::1\r\n"),
    "chunked finished": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"sta\r\n1d\r\ntus": "finished", "result": 7}\r\n0\r\n\r\n'
    ),
    "until close, finished": answer_bytes(
        200, b'{"status": "finished", "result": "r"}', extra="Connection: close\r\n", length=False
    ),
    "HTTP/1.0 accepted": b"HTTP/1.0 202 Accepted\r\nContent-Length: 2\r\n\r\n{}",
    "100 Continue then finished": b"HTTP/1.1 100 Continue\r\n\r\n"
    + answer_bytes(200, b'{"status": "finished", "result": 1}'),
    "garbage": b"SPAM SPAM SPAM\r\n\r\n",
    "until close, Transfer-Encoding identity": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n"
    b'{"status": "finished", "result": 1}',
    "cut after the head": b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"status"',
    "nothing, then closed": b"",
}


@pytest.mark.parametrize("name", list(ANSWERS))
def test_every_answer_is_judged_as_aiohttp_judged_it(name: str):
    reply = ANSWERS[name]

    async def once(lean: bool) -> Answer:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await gpu.read_request(reader)
            writer.write(reply)
            await writer.drain()
            if b"Content-Length" not in reply or name in ("cut after the head", "nothing, then closed"):
                writer.close()  # the answer ends with the connection
            else:
                await asyncio.sleep(0.5)

        async with raw_gpu(script) as gpu:
            return await send_once(gpu.url, lean=lean)

    async def scenario() -> None:
        lean, plain = await once(True), await once(False)
        assert (lean.verdict, lean.status, lean.result, lean.unhealthy) == (
            plain.verdict,
            plain.status,
            plain.result,
            plain.unhealthy,
        ), (lean, plain)
        if plain.verdict != Verdict.UNKNOWN:  # aiohttp's exception texts are its own
            assert lean.error == plain.error

    run(scenario())


def test_a_redirect_is_followed_within_the_origin_with_the_post_and_its_body():
    async def scenario() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            while True:
                await gpu.read_request(reader)
                first = len(gpu.requests) == 1
                writer.write(answer_bytes(307, b"", extra="Location: /infer/\r\n") if first else ACCEPTED)
                await writer.drain()

        async with raw_gpu(script) as gpu:
            answer = await send_once(gpu.url)
        assert answer.verdict == Verdict.ACCEPTED
        assert [h.split(b"\r\n")[0] for h, _ in gpu.requests] == [
            b"POST /infer HTTP/1.1",
            b"POST /infer/ HTTP/1.1",
        ]
        assert orjson.loads(gpu.requests[1][1]) == JOB

    run(scenario())


def test_silence_is_no_answer_after_the_read_timeout_and_the_request_is_not_sent_again():
    async def scenario() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await gpu.read_request(reader)
            await asyncio.sleep(10)

        async with raw_gpu(script) as gpu:
            c = await client(read=0.3)
            try:
                started = asyncio.get_running_loop().time()
                answer = await c.send(gpu.url, JOB)
                waited = asyncio.get_running_loop().time() - started
            finally:
                await c.close()
        assert answer.verdict == Verdict.UNKNOWN and answer.unhealthy, answer
        assert "0.3 s" in (answer.error or "")
        assert waited >= 0.3
        assert len(gpu.requests) == 1  # the GPU may be running it: only its callback or the lease decides

    run(scenario())


def test_a_slow_answer_in_pieces_is_not_cut_by_the_read_timeout():
    body = orjson.dumps({"status": "finished", "result": "z" * 4000})

    async def scenario() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await gpu.read_request(reader)
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            for i in range(0, len(body), 1000):  # 5 pieces, 0.15 s apart: 0.75 s in all, under 0.4 s each
                await asyncio.sleep(0.15)
                writer.write(body[i : i + 1000])
                await writer.drain()

        async with raw_gpu(script) as gpu:
            answer = await send_once(gpu.url, read=0.4)
        assert answer.verdict == Verdict.FINISHED, answer
        assert answer.result == "z" * 4000

    run(scenario())


def test_a_connection_refused_is_a_retry_against_the_gpu():
    async def scenario() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, not listening: refused
            answer = await send_once(f"http://127.0.0.1:{port}/infer")
        assert answer.verdict == Verdict.RETRY and answer.unhealthy, answer
        assert "connection failed" in (answer.error or "")

    run(scenario())


def test_a_name_that_does_not_resolve_is_a_retry_against_the_gpu():
    async def scenario() -> None:
        answer = await send_once("http://gpu-that-is-not-there.invalid:8000/infer")
        assert answer.verdict == Verdict.RETRY and answer.unhealthy, answer

    run(scenario())


def test_an_answer_over_the_cap_is_not_read_and_its_connection_not_reused():
    async def scenario() -> None:
        big = answer_bytes(200, b'{"status": "finished", "result": "' + b"x" * 5000 + b'"}')

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            while True:
                await gpu.read_request(reader)
                writer.write(big if len(gpu.requests) == 1 else ACCEPTED)
                await writer.drain()

        async with raw_gpu(script) as gpu:
            c = await client(max_answer_bytes=1000)
            try:
                first = await c.send(gpu.url, JOB)
                second = await c.send(gpu.url, JOB)
            finally:
                await c.close()
        assert first.verdict == Verdict.FAILED and "GPU_ANSWER_MAX_BYTES" in (first.error or "")
        assert not first.unhealthy
        assert second.verdict == Verdict.ACCEPTED
        assert gpu.connections == 2  # the cut answer's connection was closed, not given the next request

    run(scenario())


def test_connection_close_and_a_server_closing_an_idle_connection_cost_nothing():
    async def scenario() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await gpu.read_request(reader)
            if n == 1:  # says it closes
                writer.write(answer_bytes(202, b"{}", extra="Connection: close\r\n"))
            else:  # answers, then closes the idle connection (a short keep-alive timeout)
                writer.write(ACCEPTED)
            await writer.drain()
            await asyncio.sleep(0.05)

        async with raw_gpu(script) as gpu:
            c = await client()
            try:
                answers = []
                for _ in range(4):
                    answers.append(await c.send(gpu.url, JOB))
                    await asyncio.sleep(0.2)  # the server's close has arrived
            finally:
                await c.close()
        assert [a.verdict for a in answers] == [Verdict.ACCEPTED] * 4, answers
        assert gpu.connections == 4

    run(scenario())


def test_more_requests_than_connections_wait_for_one_and_none_fails():
    async def scenario() -> None:
        release = asyncio.Event()

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            while True:
                await gpu.read_request(reader)
                await release.wait()
                writer.write(ACCEPTED)
                await writer.drain()

        async with raw_gpu(script) as gpu:
            c = await client()
            assert c._lean is not None
            c._lean.limit = 2
            try:
                sends = [asyncio.ensure_future(c.send(gpu.url, JOB)) for _ in range(6)]
                await asyncio.sleep(0.3)
                assert gpu.open_now == 2 and len(gpu.requests) == 2  # the others wait for a connection
                sends[3].cancel()  # one waiting gives up: its turn passes on
                release.set()
                done = await asyncio.gather(*sends, return_exceptions=True)
            finally:
                await c.close()
        verdicts = [a.verdict if isinstance(a, Answer) else type(a).__name__ for a in done]
        assert verdicts == [Verdict.ACCEPTED] * 3 + ["CancelledError"] + [Verdict.ACCEPTED] * 2
        assert gpu.most_open == 2

    run(scenario())


def test_room_is_made_by_closing_an_idle_connection_to_another_gpu():
    async def scenario() -> None:
        holders: list[RawGpu] = []
        async with (
            raw_gpu(keep_answering(lambda: holders[0])) as a,
            raw_gpu(keep_answering(lambda: holders[1])) as b,
        ):
            holders += [a, b]
            c = await client()
            assert c._lean is not None
            c._lean.limit = 1
            try:
                first = await c.send(a.url, JOB)
                second = await c.send(b.url, JOB)  # a's idle connection is closed to make room
                third = await c.send(a.url, JOB)
            finally:
                await c.close()
        assert [first.verdict, second.verdict, third.verdict] == [Verdict.ACCEPTED] * 3
        assert (a.connections, b.connections) == (2, 1)

    run(scenario())


@pytest.mark.parametrize(
    ("url", "lean"),
    [
        ("http://127.0.0.1:9/x", True),
        ("http://gpu-3:8000", True),
        ("http://[::1]:8000/x", True),
        ("https://gpu:8443/x", False),  # TLS: aiohttp
        ("http://user:pw@gpu/x", False),  # credentials in the URL: aiohttp
        ("http://gpu/é", False),  # not ASCII: aiohttp quotes it
        ("http://gpu:99999/x", False),  # a port out of range: aiohttp's error
        ("http://gpu/a b", False),
        ("http://gpu:0/x", False),  # port 0, not port 80
    ],
)
def test_which_urls_the_lean_client_takes(url: str, lean: bool):
    made = target(url, {"Content-Type": "application/json"})
    assert (made is not None) == lean
    if made is not None:
        assert made.head.startswith(b"POST /")
        assert b"\r\nHost: " in made.head


def test_a_closed_pool_closes_its_connections():
    async def scenario() -> None:
        holder: list[RawGpu] = []
        async with raw_gpu(keep_answering(lambda: holder[0])) as gpu:
            holder.append(gpu)
            pool = LeanPool(limit=4, connect_timeout=1, read_timeout=1)
            to = pool.target(gpu.url, {})
            assert to is not None
            reply = await pool.post(to, b"{}", 1000)
            assert reply.status == 202 and reply.whole
            pool.close()
            await asyncio.sleep(0.1)
            assert gpu.open_now == 0
            assert pool._open == 0

    run(scenario())


def test_an_endless_header_is_cut_off_not_buffered():
    async def scenario() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await gpu.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nX-Spam: ")
            for _ in range(400):  # 4 MiB of one header value, never ended
                writer.write(b"a" * 10_000)
                await writer.drain()

        async with raw_gpu(script) as gpu:
            answer = await send_once(gpu.url)
        assert answer.verdict == Verdict.UNKNOWN, answer
        assert "head is over" in (answer.error or "")

    run(scenario())


@pytest.mark.parametrize("lean", [True, False])
def test_a_token_with_a_newline_or_a_bad_host_name_gets_an_answer_not_an_exception(lean: bool):
    async def scenario() -> None:
        c = GpuClient(bearer_token="tok\r\nX-Injected: 1", connect_timeout=1, request_timeout=1, lean=lean)
        await c.start()
        try:
            injected = await c.send("http://127.0.0.1:9/infer", JOB)
            bad_host = await c.send("http://a..b/infer", JOB)
        finally:
            await c.close()
        assert injected.verdict == Verdict.RETRY, injected
        # never sent, and about the GPU's registration: refused (no attempt used; the GPU counts a failure)
        assert bad_host.verdict == Verdict.REFUSED and bad_host.unhealthy, bad_host

    run(scenario())


def test_a_second_answer_to_one_request_closes_the_connection_not_the_next_request():
    """A server sending one whole answer and the start of another in the same packet: the connection is out
    of step. Reused, the next request's answer would be read after those stray bytes (an outside review)."""

    async def scenario() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await gpu.read_request(reader)
            writer.write(ACCEPTED + (b"HTTP/1.1 500 X\r\nContent-Le" if n == 1 else b""))
            await writer.drain()
            while True:
                await gpu.read_request(reader)
                writer.write(ACCEPTED)
                await writer.drain()

        async with raw_gpu(script) as gpu:
            c = await client(read=2)
            try:
                answers = [await c.send(gpu.url, JOB) for _ in range(3)]
            finally:
                await c.close()
        assert [a.verdict for a in answers] == [Verdict.ACCEPTED] * 3, answers
        assert gpu.connections == 2  # the first connection was dropped, the second kept

    run(scenario())


def test_an_answer_before_the_whole_payload_was_written_is_not_followed_by_the_next_request():
    """A GPU answering 413 at once to a large payload it does not read, and keeping the connection: the rest
    of that payload is still ours to write, so the connection is closed, not used for the next request."""

    async def scenario() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            if n == 1:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer_bytes(413, b'{"error": "too large"}'))
                await writer.drain()
                await asyncio.sleep(10)  # reads no more
                return
            while True:
                await gpu.read_request(reader)
                writer.write(ACCEPTED)
                await writer.drain()

        async with raw_gpu(script) as gpu:
            pool = LeanPool(limit=4, connect_timeout=1, read_timeout=2)
            to = pool.target(gpu.url, {})
            assert to is not None
            try:
                first = await pool.post(to, b"x" * (64 << 20), 1000)
                second = await pool.post(to, b"{}", 1000)
            finally:
                pool.close()
        assert (first.status, second.status) == (413, 202)
        assert gpu.connections == 2

    run(scenario())


def test_a_request_waiting_for_room_when_the_pool_closes_is_not_sent():
    async def scenario() -> None:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
            await gpu.read_request(reader)
            await asyncio.sleep(5)  # holds the pool's one connection

        async with raw_gpu(script) as gpu:
            pool = LeanPool(limit=1, connect_timeout=1, read_timeout=5)
            to = pool.target(gpu.url, {})
            assert to is not None
            holding = asyncio.ensure_future(pool.post(to, b"{}", 1000))
            while not gpu.requests:
                await asyncio.sleep(0.01)
            waiting = asyncio.ensure_future(pool.post(to, b"{}", 1000))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            pool.close()
            with pytest.raises(ConnectFailed, match="closed"):
                await asyncio.wait_for(waiting, 2)
            with pytest.raises(NoAnswer):
                await asyncio.wait_for(holding, 2)
            await asyncio.sleep(0.1)
            assert gpu.connections == 1
            assert pool._open == 0

    run(scenario())
