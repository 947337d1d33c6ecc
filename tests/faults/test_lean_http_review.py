"""The lean client (dispatcher/gpus/lean_http.py) after a second outside attack-review (2026-12-03, a helper
that did not write it): each test here failed before its fix.

- a keep-alive connection the GPU has just closed (EOF seen, ``connection_lost`` not yet run) was handed to
  the next job, whose bytes the closing transport dropped: UNKNOWN for a job never sent;
- an endless trailer after a chunked body grew memory and blocked the loop (the head's bound stopped at the
  head);
- a connection closed with part of a large payload unsent kept its socket (and the payload) open, uncounted,
  for as long as the GPU held it;
- a request whose connection was being made when the pool closed was sent all the same;
- a ``Transfer-Encoding: xchunked`` answer was taken for chunked; control characters in a URL went onto the
  request line raw (a GPU's 400: FAILED, final, for every job sent there).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from dispatcher.eager import start_now
from dispatcher.gpus.gpu_client import Verdict
from dispatcher.gpus.lean_http import ConnectFailed, LeanPool, NoAnswer, _Conn
from dispatcher.gpus.lean_target import target
from tests.faults.test_lean_http import (
    ACCEPTED,
    JOB,
    RawGpu,
    answer_bytes,
    client,
    keep_answering,
    raw_gpu,
    run,
    send_once,
)


class ThreadGpu:
    """Answers one request per connection, then closes it 0.1 s later (a short keep-alive timeout); in a
    thread, so that its close happens while the client's loop is busy."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/infer"
        self.requests = 0
        self.stop = False
        threading.Thread(target=self.serve, daemon=True).start()

    def close(self) -> None:
        self.stop = True
        self.sock.close()

    def serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self.one, args=(conn,), daemon=True).start()

    def one(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += conn.recv(65536)
            self.requests += 1
            conn.sendall(ACCEPTED)
            time.sleep(0.1)


def test_a_job_fired_while_the_gpu_closes_its_idle_connection_goes_on_a_new_one() -> None:
    async def scenario() -> None:
        gpu = ThreadGpu()
        c = await client(read=2)
        loop = asyncio.get_running_loop()
        try:
            first = await c.send(gpu.url, JOB)
            fired: list[asyncio.Task[object]] = []
            loop.call_later(0.02, time.sleep, 0.3)  # the loop busy while the GPU closes the idle connection
            loop.call_later(0.03, lambda: fired.append(start_now(c.send(gpu.url, JOB))))  # the same turn
            await asyncio.sleep(0.5)
            second = await fired[0]
        finally:
            await c.close()
            gpu.close()
        assert first.verdict == Verdict.ACCEPTED
        assert second.verdict == Verdict.ACCEPTED, (second, gpu.requests)
        assert gpu.requests == 2

    run(scenario())


def test_an_endless_trailer_is_cut_off_not_buffered(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = 0
    limit = 24 << 20
    holder: list[RawGpu] = []
    # What the client read, not what the server wrote: the server's count also holds what loopback's socket
    # buffers took (they grow to several MiB), so it passed 4 MiB on a loaded machine, the client
    # having cut the answer off at the same point (a full-suite run)
    took = 0
    real = _Conn.data_received

    def counted(self: _Conn, data: bytes) -> None:
        nonlocal took
        took += len(data)
        real(self, data)

    monkeypatch.setattr(_Conn, "data_received", counted)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        nonlocal sent
        await holder[0].read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-T: ")
        while sent < limit:
            writer.write(b"a" * 65536)
            sent += 65536
            await writer.drain()
        await asyncio.sleep(5)

    async def scenario() -> None:
        async with raw_gpu(script) as gpu:
            holder.append(gpu)
            answer = await send_once(gpu.url, read=2)
        assert answer.verdict == Verdict.UNKNOWN, answer
        assert took < 1 << 20, f"the client took {took} bytes of one trailer line"
        assert sent < limit, "the client read to the end"

    run(scenario())


@pytest.mark.parametrize("case", ["early_413", "read_timeout"])
def test_a_closed_connection_does_not_stay_open_to_flush_a_payload_nobody_reads(case: str) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if case == "early_413":
            writer.write(answer_bytes(413, b'{"detail": "too large"}'))
            await writer.drain()
        await asyncio.sleep(3)  # holds the connection and reads no more

    async def scenario() -> None:
        async with raw_gpu(script) as gpu:
            pool = LeanPool(limit=1, connect_timeout=1, read_timeout=0.3)
            made = []
            real = pool._connect

            async def keep(key: tuple[str, int]) -> object:
                conn = await real(key)
                made.append(conn)
                return conn

            pool._connect = keep  # type: ignore[method-assign, assignment]
            to = pool.target(gpu.url, {})
            assert to is not None
            try:
                reply = await pool.post(to, b"x" * (16 << 20), 1000)
                assert reply.status == 413
            except NoAnswer:
                assert case == "read_timeout"
            pool.close()
            await asyncio.sleep(0.5)
            sock = made[0].transport.get_extra_info("socket")
            assert sock.fileno() == -1, "a closed connection still holds its socket (uncounted)"
            assert pool._open == 0

    run(scenario())


def test_a_request_connecting_when_the_pool_closes_is_not_sent() -> None:
    async def scenario() -> None:
        holder: list[RawGpu] = []
        async with raw_gpu(keep_answering(lambda: holder[0])) as gpu:
            holder.append(gpu)
            pool = LeanPool(limit=4, connect_timeout=2, read_timeout=2)
            real = pool._open_connection

            async def slow_connect(conn: object, key: tuple[str, int]) -> None:  # a SYN retransmitted
                await asyncio.sleep(0.2)
                await real(conn, key)  # type: ignore[arg-type]

            pool._open_connection = slow_connect  # type: ignore[method-assign, assignment]
            to = pool.target(gpu.url, {})
            assert to is not None
            post = asyncio.ensure_future(pool.post(to, b"{}", 1000))
            await asyncio.sleep(0.05)
            pool.close()
            with pytest.raises(ConnectFailed, match="closed"):
                await asyncio.wait_for(post, 3)
            await asyncio.sleep(0.1)
            assert gpu.requests == []
            assert pool._open == 0

    run(scenario())


def test_a_closed_pool_is_not_the_gpus_failure() -> None:
    async def scenario() -> None:
        holder: list[RawGpu] = []
        async with raw_gpu(keep_answering(lambda: holder[0])) as gpu:
            holder.append(gpu)
            c = await client()
            try:
                assert c._lean is not None
                c._lean.close()  # as at a stop, while a job is being fired
                answer = await c.send(gpu.url, JOB)
            finally:
                await c.close()
        assert (answer.verdict, answer.unhealthy) == (Verdict.NOT_SENT, False), answer

    run(scenario())


def test_a_transfer_encoding_that_only_ends_in_chunked_is_read_to_the_close() -> None:
    finished = b'{"status": "finished", "result": "r"}'

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await holder[0].read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n" + finished)
        await writer.drain()
        writer.close()

    holder: list[RawGpu] = []

    async def scenario() -> None:
        async with raw_gpu(script) as gpu:
            holder.append(gpu)
            lean = await send_once(gpu.url, read=2)
        assert (lean.verdict, lean.result) == (Verdict.FINISHED, "r"), lean

    run(scenario())


@pytest.mark.parametrize("ch", ["\x00", "\x01", "\x0b", "\x1f", "\x7f"])
def test_a_url_with_a_control_character_is_left_to_aiohttp(ch: str) -> None:
    assert target(f"http://gpu:8000/in{ch}fer", {"Content-Type": "application/json"}) is None
