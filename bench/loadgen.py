"""A lean HTTP/1.1 load generator for the serving benchmarks: each of ``concurrency`` keep-alive connections sends
prebuilt multipart requests and reads each answer by its Content-Length (or its chunks), so the client's own CPU per
request stays near a tenth of a millisecond (httpx's AsyncClient took ~1 ms, on the two cores the service needs).

It only speaks what the benchmark sends: POST of one photo in multipart field ``image``; a status line, headers and
a body are read and the status is checked by the caller.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

BOUNDARY = "drspot-bench-7c1f"


def multipart_request(url: str, path: str, photo: bytes, extra_headers: dict[str, str] | None = None) -> bytes:
    """The bytes of one keep-alive POST of ``photo`` to ``path`` on ``url`` (multipart, field ``image``)."""
    host = urlsplit(url).netloc
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + photo
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in (extra_headers or {}).items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Connection:
    """One keep-alive connection; reopened when the server closes it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """The status and body of the answer to ``request``."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(request)
            await self.writer.drain()
            return await self._answer()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.close()
            raise

    async def _answer(self) -> tuple[int, bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunks.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(c[:-2] for c in chunks)
        else:  # no length: the body runs to the end of the connection
            body = await self.reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run(url: str, requests: list[bytes], n: int, concurrency: int, warmup: int = 4) -> dict:
    """``n`` requests (``requests`` in turn) over ``concurrency`` connections: per-request latencies, the wall time,
    errors (non-200 or a broken connection) and the client's own CPU per request."""
    conns = [Connection(url) for _ in range(concurrency)]
    for k in range(min(warmup, len(requests))):
        await conns[k % concurrency].send(requests[k])
    lat: list[float] = []
    errors = 0
    queue = list(range(n))

    async def worker(conn: Connection) -> None:
        nonlocal errors
        while queue:
            k = queue.pop()
            t = time.perf_counter()
            try:
                status, _ = await conn.send(requests[k % len(requests)])
            except (ConnectionError, asyncio.IncompleteReadError):
                status = 0
            lat.append(time.perf_counter() - t)
            errors += status != 200

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(c) for c in conns))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for c in conns:
        c.close()
    return {"latencies": lat, "wall": wall, "errors": errors, "client_cpu_ms_per_request": round(cpu / n * 1000, 2)}
