"""The worker placement: SARAi's engine server as a supervised child process on 127.0.0.1.

A crash in native code (llama.cpp, torch) ends the child, not Home Assistant: the turn in flight fails with a
translated error, the worker restarts by itself with backoff, and the next turn answers. A worker that keeps
dying is reported (``on_crash_loop``) so that the integration can raise a repair issue.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
import json
import logging
import os
from pathlib import Path
import secrets
import signal
import sys
import time

from .errors import EngineError

_LOGGER = logging.getLogger(__name__)

ENGINE_PARENT = str(Path(__file__).resolve().parent.parent)  # so that ``python -m engine.server`` finds us
CRASH_WINDOW_S = 300.0
CRASH_LOOP_COUNT = 3
BACKOFF_S = (0.5, 2.0, 5.0, 15.0, 30.0)


class WorkerUnavailable(EngineError):
    """The worker process crashed, hung or could not start."""

    translation_key = "worker_unavailable"


class WorkerProcess:
    """Start, watch, restart and stop one engine-server child process."""

    def __init__(
        self,
        server_args: list[str],
        *,
        startup_timeout_s: float = 120.0,
        on_crash_loop: Callable[[int], None] | None = None,
        python: str = sys.executable,
    ) -> None:
        """``server_args``: the engine server's model arguments (``--gguf``, ``--budget-mb``, ...)."""
        self._args = list(server_args)
        self._startup_timeout_s = startup_timeout_s
        self._on_crash_loop = on_crash_loop
        self._python = python
        self.api_key = secrets.token_urlsafe(24)  # a fresh key per worker: only Home Assistant can talk to it
        self._proc: asyncio.subprocess.Process | None = None
        self._port: int | None = None
        self._lock = asyncio.Lock()
        self._crashes: deque[float] = deque(maxlen=20)
        self._drain: asyncio.Task[None] | None = None
        self._closed = False
        self.restarts = 0
        self.starts = 0
        self.last_exit: int | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def alive(self) -> bool:
        """Whether the child runs."""
        return self.pid is not None

    @property
    def base_url(self) -> str | None:
        """The child's OpenAI-compatible base URL while it runs."""
        return f"http://127.0.0.1:{self._port}/v1" if self.alive and self._port else None

    def rss_bytes(self) -> int:
        """The child's resident memory (counts against the budget); 0 when not running."""
        pid = self.pid
        if pid is None:
            return 0
        try:
            with open(f"/proc/{pid}/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:  # pragma: no cover - the child exited between the pid check and the read
            pass
        return 0

    async def ensure(self) -> str:
        """The base URL of a running worker: started (or restarted, after its backoff) when needed."""
        if self._closed:
            raise WorkerUnavailable("the worker is shut down")
        async with self._lock:
            if self.base_url is not None:
                return self.base_url
            if self._proc is not None:  # it ran before and died
                self._note_crash(self._proc.returncode)
                await asyncio.sleep(self._backoff())
            return await self._start()

    def _backoff(self) -> float:
        recent = sum(1 for t in self._crashes if time.monotonic() - t < CRASH_WINDOW_S)
        return BACKOFF_S[min(max(recent - 1, 0), len(BACKOFF_S) - 1)]

    def _note_crash(self, code: int | None) -> None:
        now = time.monotonic()
        self._crashes.append(now)
        self.last_exit = code
        recent = sum(1 for t in self._crashes if now - t < CRASH_WINDOW_S)
        _LOGGER.warning("The SARAi worker stopped (exit code %s); restarting it", code)
        if recent >= CRASH_LOOP_COUNT and self._on_crash_loop is not None:
            self._on_crash_loop(recent)

    async def _start(self) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SARAI_API_KEY")}
        env["PYTHONPATH"] = ENGINE_PARENT
        env["SARAI_API_KEY"] = self.api_key  # by environment: never on a command line other users can read
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [self._python, "-m", "engine.server", "--host", "127.0.0.1", "--port", "0", *self._args]
        _LOGGER.debug("Starting the SARAi worker: %s", " ".join(cmd))
        self._proc = await asyncio.create_subprocess_exec(
            *cmd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # a signal to Home Assistant's process group does not reach the worker
        )
        self.starts += 1
        if self.starts > 1:
            self.restarts += 1
        try:
            async with asyncio.timeout(self._startup_timeout_s):
                self._port = await self._read_port()
        except (TimeoutError, EngineError) as err:
            await self._kill()
            raise WorkerUnavailable(f"the worker did not start: {err or 'timeout'}") from err
        self._drain = asyncio.get_running_loop().create_task(self._drain_output(), name="sarai worker output")
        _LOGGER.info("SARAi worker %s listening on 127.0.0.1:%s", self._proc.pid, self._port)
        return f"http://127.0.0.1:{self._port}/v1"

    async def _read_port(self) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        while True:
            line = await self._proc.stdout.readline()
            if not line:
                raise WorkerUnavailable(f"the worker exited with code {await self._proc.wait()}")
            text = line.decode("utf-8", errors="replace").strip()
            try:
                message = json.loads(text)
            except ValueError:
                _LOGGER.debug("worker: %s", text.replace(self.api_key, "**REDACTED**"))
                continue
            if isinstance(message, dict) and message.get("event") == "listening":
                return int(message["port"])

    async def _drain_output(self) -> None:
        """Forward the child's output to the debug log (the key never appears)."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        while line := await proc.stdout.readline():
            _LOGGER.debug("worker: %s", line.decode("utf-8", errors="replace").rstrip().replace(self.api_key, "**"))

    async def wait_exit(self, timeout_s: float) -> bool:
        """Whether the child exited on its own (within ``timeout_s``): a dropped connection is then its crash."""
        proc = self._proc
        if proc is None or self._closed:
            return False
        if proc.returncode is None:
            try:
                async with asyncio.timeout(timeout_s):
                    await proc.wait()
            except TimeoutError:
                return False
        self.last_exit = proc.returncode
        return True

    async def restart(self) -> None:
        """Kill a hung worker; the next ``ensure`` starts a new one."""
        async with self._lock:
            await self._kill()

    async def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            await self._stop_drain()
            return
        try:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        except ProcessLookupError:  # pragma: no cover - it exited between the returncode check and the signal
            pass
        await self._stop_drain()

    async def _stop_drain(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
            try:
                await self._drain
            except asyncio.CancelledError:
                pass
            self._drain = None

    async def close(self) -> None:
        """Stop the worker for good (unload, shutdown): no process is left behind."""
        self._closed = True
        async with self._lock:
            await self._kill()
