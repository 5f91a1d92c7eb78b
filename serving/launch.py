"""Start ``drspot serve`` in the background and wait until it is ready (demo, benchmarks, tests)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from infra.net import free_port  # noqa: F401  (the tests and the demo take it from here too)

SOURCE = Path(__file__).resolve().parent.parent
STARTUP_FAILED = "Application startup failed"  # uvicorn's line when the service's __init__ raised


def last_error(text: str) -> str:
    """The last exception line of a log (``IndexError: pop from empty list``), else its last line."""
    import re

    lines = [x.strip() for x in text.splitlines() if x.strip()]
    errors = [x for x in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Exit)\b.*:", x)]
    return (errors or lines or ["(no output)"])[-1][:500]


def start_failure(proc: subprocess.Popen, log: Path) -> str | None:
    """Why a starting service process will never answer /readyz (it exited, or its startup raised and BentoML
    would only restart it again and again), or None while it may still come up."""
    if proc.poll() is not None:
        return f"exited {proc.returncode}"
    if log.is_file() and STARTUP_FAILED in log.read_text(errors="replace"):
        return "its startup failed"
    return None


class Server:
    """A ``drspot serve`` subprocess on a free loopback port; ``stop()`` ends it (and its workers)."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        *extra: str,
        port: int | None = None,
        config: Path | None = None,
        timeout: float = 180,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "drspot"
        self.log = log
        first = ["--config", str(config)] if config else []
        self.proc = subprocess.Popen(
            [str(exe), *first, "serve", "--port", str(self.port), *extra],
            env=env,
            cwd=SOURCE,
            stdout=open(log, "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            failure = start_failure(self.proc, log)
            if failure:
                self.stop()
                raise RuntimeError(f"drspot serve {failure}:\n{log.read_text(errors='replace')[-4000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"drspot serve not ready in {timeout:g} s:\n{log.read_text()[-4000:]}")

    def stop(self) -> None:
        """SIGTERM the service's process group and return once every process of it is gone (BentoML's API workers
        can outlive the leader for a moment: a caller that checks right after must not see them); SIGKILL after
        20 s."""
        import signal
        import time

        def group_alive() -> bool:  # a live (not zombie) process left in the service's group
            import psutil

            for p in psutil.process_iter(["status"]):
                try:
                    if os.getpgid(p.pid) == self.proc.pid and p.info["status"] != psutil.STATUS_ZOMBIE:
                        return True
                except (ProcessLookupError, psutil.Error):
                    continue
            return False

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        while group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
