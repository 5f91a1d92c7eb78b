"""``drspot serve``: the endpoint on the configured address, and a switch to each newly deployed Bento without
downtime.

The process listening on ``serving.host:serving.port`` is a small front (aiohttp) that passes every request to
a backend — ``bentoml serve <Bento>`` on a free loopback port — and its answer back unchanged. Every
``serving.follow_s`` seconds it reads ``<state home>/.drspot/deployed.json`` (written by ``drspot deploy``, by
hand or by a retrain that promoted a model, e.g. one run by ``drspot schedule``); when it names another Bento:

1. the new Bento is started beside the old one, on another free loopback port;
2. once its ``/readyz`` answers, new requests go to it (one assignment: a request is routed to exactly one);
3. the old backend finishes the requests it holds (drained; at most ``serving.drain_s``) and is stopped.

A new Bento that does not start (a worker whose startup raises, or no ``/readyz`` within
``gate.serving_check.start_timeout_s``) is stopped and reported, and the old one keeps serving; that Bento is
not tried again until ``deployed.json`` names another. A backend that dies is restarted on the same Bento.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from infra.config import Config
from serving.connections import Gate, listen

HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers"}
HOP |= {"transfer-encoding", "upgrade", "content-length", "host"}


# BentoML's routes that only the service itself calls: the batched model stage (its items are not checked as
# uploads are: no format allowlist, no pixel budget, nothing logged)
INTERNAL = ("/infer",)


class Backend:
    """One ``bentoml serve`` process of one Bento on a free loopback port, with the requests it holds."""

    def __init__(self, bento: str, env: dict[str, str], cwd: Path, log: Path) -> None:
        from infra.net import free_port

        self.bento, self.port = bento, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.inflight = 0
        self.log = log
        from infra.state import StatePaths
        from serving.backend import command

        self.metrics = StatePaths(cwd).metrics("backend", self.port)  # its own Prometheus folder (serving/backend.py)
        cmd = command(bento, "127.0.0.1", self.port, self.metrics)
        # same process group as the front: whatever stops the front's group stops its backends too
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115

    async def ready(self, session, timeout: float) -> dict[str, Any]:
        """The backend's /readyz once it answers; raises RuntimeError naming why it did not."""
        import aiohttp

        from serving.launch import start_failure

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            failure = start_failure(self.proc, self.log)
            if failure:
                raise RuntimeError(f"{failure}: {_tail(self.log)}")
            try:
                async with session.get(f"{self.url}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return await r.json()
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.5)
        raise RuntimeError(f"no /readyz within {timeout:g} s: {_tail(self.log)}")

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.metrics, ignore_errors=True)  # its counters went with it


def _tail(log: Path) -> str:
    from serving.launch import last_error

    return f"{last_error(log.read_text(errors='replace') if log.is_file() else '')} (log {log})"


class Front:
    """The listening process: routes to the current backend, follows ``deployed.json``."""

    def __init__(self, cfg: Config, bento: str, env: dict[str, str], state: Path | None, follow: bool) -> None:
        self.cfg, self.env, self.state, self.follow = cfg, env, state, follow
        self.logs = cfg.runtime.serve_logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.first = bento
        self.current: Backend | None = None
        # Bentos that did not start: tried again with backoff (attempts, next try on the monotonic clock, why)
        self.failed: dict[str, dict[str, Any]] = {}
        self.switching = False
        self.session = None
        self.inflight = 0  # requests this front holds now (serving.max_inflight)
        # open connections: capped, and closed when no request's headers arrive in time (serving/connections.py)
        self.gate = Gate(cfg.serving.max_connections, cfg.serving.header_timeout_s)

    def _start(self, bento: str) -> Backend:
        name = bento.replace(":", "_")
        return Backend(bento, self.env, self.cfg.home, self.logs / f"{name}-{int(time.time())}.log")

    async def startup(self, app) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        backend = self._start(self.first)
        try:
            ready = await backend.ready(self.session, self.cfg.gate.serving_check.start_timeout_s)
        except RuntimeError as e:
            backend.stop()
            raise RuntimeError(f"{self.first} did not start: {e}") from None
        self.current = backend
        print(f"  backend {backend.bento} on {backend.url}: {ready.get('models')}", flush=True)
        app["follow"] = asyncio.create_task(self._follow()) if self.follow and self.state else None

    async def cleanup(self, app) -> None:
        task = app.get("follow")
        if task is not None:
            task.cancel()
        if self.current is not None:
            self.current.stop()
        if self.session is not None:
            await self.session.close()

    def _deployed(self) -> str | None:
        try:
            return json.loads(self.state.read_text()).get("bento")
        except (OSError, ValueError):
            return None

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.serving.follow_s)
            try:
                wanted = self._deployed()
                if self.current.proc.poll() is not None:  # the backend died: the same Bento again
                    print(
                        f"  backend {self.current.bento} exited {self.current.proc.returncode}; restarting", flush=True
                    )
                    await self.switch(self.current.bento)
                elif wanted and wanted != self.current.bento and self._may_try(wanted):
                    await self.switch(wanted)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001  (the front keeps serving whatever goes wrong here)
                print(f"  follow: {type(e).__name__}: {e}", flush=True)

    def _may_try(self, bento: str) -> bool:
        f = self.failed.get(bento)
        return f is None or time.monotonic() >= f["next_try"]

    def _failed(self, bento: str, why: str, serving: str) -> None:
        """Record a Bento that did not start: retried after 30 s, 60 s, ... up to 15 min; alerted the first time."""
        f = self.failed.setdefault(bento, {"attempts": 0})
        f["attempts"] += 1
        wait = min(30 * 2 ** (f["attempts"] - 1), 900)
        f.update(next_try=time.monotonic() + wait, reason=why[:500], retry_in_s=wait)
        print(f"  {bento} did not start ({why}); still serving {serving}; next try in {wait} s", flush=True)
        if f["attempts"] == 1:  # in a thread: its sinks (a webhook, Prefect's events) must not hold the requests
            asyncio.get_running_loop().run_in_executor(None, self._alert, bento, why, serving)

    def _alert(self, bento: str, why: str, serving: str) -> None:
        from components.monitoring import alerts

        try:
            alerts.send(
                self.cfg,
                "serving",
                f"Bento {bento} did not start; still serving {serving}",
                {"bento": bento, "reason": why[:2000], "serving": serving},
            )
        except Exception as e:  # noqa: BLE001  (an alert that cannot be sent must not stop the front)
            print(f"  alert not sent: {type(e).__name__}: {e}", flush=True)

    async def switch(self, bento: str) -> bool:
        """Start ``bento``, route to it once ready, drain and stop the old backend. False: the old one stays."""
        old = self.current
        print(f"  new Bento {bento} deployed: starting it beside {old.bento}", flush=True)
        new = self._start(bento)
        try:
            ready = await new.ready(self.session, self.cfg.gate.serving_check.start_timeout_s)
        except RuntimeError as e:
            new.stop()
            self._failed(bento, str(e), old.bento)
            return False
        self.failed.pop(bento, None)
        self.current = new  # from here on every new request goes to the new backend
        print(f"  switched to {bento} ({ready.get('models')}); draining {old.bento}", flush=True)
        deadline = time.monotonic() + self.cfg.serving.drain_s
        while old.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if old.inflight:
            print(f"  {old.inflight} request(s) still on {old.bento} after {self.cfg.serving.drain_s:g} s", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, old.stop)
        print(f"  stopped {old.bento}", flush=True)
        return True

    async def handle(self, request):
        from aiohttp import web

        s = self.cfg.serving
        if request.path.rstrip("/") in INTERNAL or request.path.startswith(tuple(f"{r}/" for r in INTERNAL)):
            return web.json_response(
                {"error": "not found", "detail": f"{request.path} is internal to the service and not served here"},
                status=404,
            )
        if self.inflight >= s.max_inflight:  # memory and CPU are bounded by configuration, not by the callers
            return web.json_response(
                {"error": "busy", "detail": f"{self.inflight} requests in flight (serving.max_inflight); retry"},
                status=503,
                headers={"Retry-After": "1"},
            )
        self.inflight += 1
        self.gate.begin(request.protocol)
        try:
            return await self._forward(request)
        finally:
            self.inflight -= 1
            self.gate.end(request.protocol)

    async def _forward(self, request):
        import aiohttp
        from aiohttp import web

        from serving.inputs import InputError, check_length

        s = self.cfg.serving
        try:
            check_length(request.headers.get("content-length"), s)
            # a client that sends its body slowly (or never) holds a slot for body_timeout_s at most
            body = await asyncio.wait_for(request.read(), timeout=s.body_timeout_s)
        except TimeoutError:
            return web.json_response(
                {"error": "request timeout", "detail": f"the body did not arrive within {s.body_timeout_s:g} s"},
                status=408,
            )
        except InputError as e:  # the service's own refusal, in its own words, before the body is read
            return web.json_response(e.body(), status=e.status)
        except web.HTTPRequestEntityTooLarge:
            return web.json_response(
                {"error": "request body too large", "detail": f"more than {s.max_body_mb:g} MB was sent"}, status=413
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        for attempt in range(2):
            backend = self.current
            backend.inflight += 1
            try:
                async with self.session.request(
                    request.method, backend.url + request.path_qs, headers=headers, data=body
                ) as r:
                    out = {k: v for k, v in r.headers.items() if k.lower() not in HOP}
                    if r.content_type == "text/event-stream":  # streamed answers pass event by event
                        return await self._relay(request, r, out)
                    payload = await r.read()
                    if request.path == "/readyz" and r.status == 200 and self.failed:
                        payload = self._with_failures(payload)
                    return web.Response(status=r.status, body=payload, headers=out)
            except aiohttp.ClientConnectionError as e:
                # the backend went away under this request (stopped after a switch, or died): once more on the
                # current one, unless it may have reached the backend already: a POST that did may have been
                # answered and logged, and a replay would log it twice (a refused connection never reached it) -
                # except one carrying an Idempotency-Key, which the log honours (logged once, under its first id)
                reached = not isinstance(e, aiohttp.ClientConnectorError)
                safe = request.method in ("GET", "HEAD", "OPTIONS") or "Idempotency-Key" in request.headers
                replay = safe or not reached
                if attempt == 1 or self.current is backend or not replay:
                    return web.json_response(
                        {"error": "service unavailable", "detail": f"the model service did not answer: {e}"},
                        status=503,
                        headers={"Retry-After": "1"},
                    )
            finally:
                backend.inflight -= 1
        raise AssertionError("unreachable")  # pragma: no cover

    def _with_failures(self, payload: bytes) -> bytes:
        """/readyz with the Bentos this front could not start (and when it tries each again)."""
        try:
            ready = json.loads(payload)
        except ValueError:
            return payload
        now = time.monotonic()
        left = {b: round(max(0.0, f["next_try"] - now)) for b, f in self.failed.items()}
        ready["front"] = {
            "failed_bentos": {
                b: {"attempts": f["attempts"], "reason": f["reason"], "next_try_in_s": left[b]}
                for b, f in self.failed.items()
            }
        }
        return json.dumps(ready).encode()

    @staticmethod
    async def _relay(request, r, headers: dict[str, str]):
        """A streamed backend answer passed on as each chunk arrives (the backend's events, not one buffered body)."""
        import aiohttp
        from aiohttp import web

        out = web.StreamResponse(status=r.status, headers=headers)
        await out.prepare(request)
        try:
            async for chunk in r.content.iter_any():
                await out.write(chunk)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:  # the status is sent: the failure
            # is the stream's last event (a backend that died mid-stream ends its chunked body short: a payload error)
            detail = json.dumps({"error": "service unavailable", "detail": f"the model service went away: {e}"})
            await out.write(f"event: error\ndata: {detail}\n\n".encode())
        await out.write_eof()
        return out

    def app(self):
        from aiohttp import web

        from serving.inputs import body_limit

        app = web.Application(client_max_size=body_limit(self.cfg.serving) + 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self.startup)
        app.on_cleanup.append(self.cleanup)
        return app


def serve(cfg: Config, bento: str, host: str, port: int, env: dict[str, str], state: Path | None, follow: bool) -> int:
    """Run the front until SIGINT/SIGTERM (then its backends are stopped)."""
    from aiohttp import web

    front = Front(cfg, bento, {**os.environ, **env}, state, follow)
    loop = asyncio.new_event_loop()
    task = loop.create_task(_run(front, host, port))
    try:
        loop.run_until_complete(task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    except RuntimeError as e:
        print(f"drspot serve: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        task.cancel()
        loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
        loop.close()
    return 0


async def _run(front: Front, host: str, port: int) -> None:
    """aiohttp's ``run_app``, listening through the front's connection gate (its cap and header deadline)."""
    from aiohttp import web

    runner = web.AppRunner(front.app(), handle_signals=True, access_log=None)
    await runner.setup()  # starts the first backend (on_startup); a RuntimeError says why it did not
    try:
        server = await listen(runner, host, port, front.gate)
        sweeping = asyncio.create_task(front.gate.sweeping())
        try:
            await asyncio.Event().wait()  # until a signal ends the loop (GracefulExit)
        finally:
            sweeping.cancel()
            server.close()
    finally:
        await runner.cleanup()
