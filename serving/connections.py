"""The connections ``drspot serve``'s front accepts: a cap on how many are open, and a deadline for each request's
headers.

A client that opens connections and sends nothing, or its headers a byte at a time (slow loris), would otherwise hold
them for as long as it likes: aiohttp's server has no header timeout. Here a connection may stay open without a
request being handled for ``serving.header_timeout_s`` at most (from when it opened, or from the end of its last
answer: the same deadline closes idle keep-alive connections), and beyond ``serving.max_connections`` open ones a
new connection is answered ``503`` with ``Retry-After`` and closed before anything is read from it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)


class _Refuse(asyncio.Protocol):
    """A connection over the cap: one 503 and closed, nothing read."""

    def __init__(self, cap: int) -> None:
        body = b'{"error": "busy", "detail": "%d connections are open (serving.max_connections); retry"}' % cap
        self.answer = REFUSAL % (len(body), body)

    def connection_made(self, transport: Any) -> None:
        transport.write(self.answer)
        transport.close()


class Gate:
    """Tracks the front's connections (``aiohttp.web.Server``'s) and closes those past their header deadline."""

    def __init__(self, max_connections: int, header_timeout_s: float) -> None:
        self.cap, self.timeout = max_connections, header_timeout_s
        self.open: dict[Any, list] = {}  # request handler -> [requests being handled, idle since]
        self.refused = 0
        self.closed_slow = 0

    def attach(self, server: Any) -> Any:
        """The protocol factory to listen with: ``server``'s handlers, counted; a refusal over the cap."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: Any) -> None:
            self.open[handler] = [0, time.monotonic()]
            made(handler, transport)

        def connection_lost(handler: Any, exc: BaseException | None) -> None:
            self.open.pop(handler, None)
            lost(handler, exc)

        server.connection_made, server.connection_lost = connection_made, connection_lost

        def factory() -> asyncio.Protocol:
            if len(self.open) >= self.cap:
                self.refused += 1
                return _Refuse(self.cap)
            return server()

        return factory

    def begin(self, handler: Any) -> None:
        """A request's headers arrived on ``handler``'s connection."""
        if handler in self.open:
            self.open[handler][0] += 1

    def end(self, handler: Any) -> None:
        if handler in self.open:
            entry = self.open[handler]
            entry[0] -= 1
            entry[1] = time.monotonic()

    def sweep(self) -> None:
        """Close each connection that has handled nothing for longer than the header deadline."""
        now = time.monotonic()
        for handler, (busy, since) in list(self.open.items()):
            if not busy and now - since > self.timeout and handler.transport is not None:
                self.closed_slow += 1
                handler.transport.close()

    async def sweeping(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.timeout / 4))
            self.sweep()


async def listen(runner: Any, host: str, port: int, gate: Gate) -> asyncio.AbstractServer:
    """Listen on ``host:port`` with ``runner``'s application behind ``gate``."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(gate.attach(runner.server), host, port, reuse_address=True)
