"""The model manager: residency planning inside a memory budget, single-flight loads,
one generation per backend at a time (FIFO), cancellation, idle unload."""

from __future__ import annotations

from abc import ABC, abstractmethod
import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
import logging
import threading
import time
from typing import Any, TypeVar

from .errors import EngineError, InsufficientMemory, RequestTimeout
from .models import MB
from .types import BackendStatus

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")

Emit = Callable[[Any], None]
Work = Callable[[Emit, threading.Event], None]


def process_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Backend(ABC):
    """Something that holds model weights in memory and runs work on them."""

    kind: str = "backend"

    def __init__(self, name: str) -> None:
        """Name the backend; nothing is loaded yet."""
        self.name = name
        self.measured_bytes: int | None = None
        self.last_used: float | None = None
        self.loads = 0

    @property
    @abstractmethod
    def loaded(self) -> bool:
        """Whether the weights are resident."""

    @abstractmethod
    def estimate_bytes(self) -> int:
        """Resident bytes once loaded, estimated without loading (a first load includes ``framework_bytes``)."""

    def framework_bytes(self) -> int:
        """Bytes that stay resident once the backend has loaded, even after it unloads (a framework's code and
        allocators: torch cannot be unimported). 0 by default."""
        return 0

    @abstractmethod
    def load(self) -> None:
        """Load the weights (runs in a worker thread)."""

    @abstractmethod
    def unload(self) -> None:
        """Release the weights (runs in a worker thread)."""


class _Slot:
    """Per-backend state owned by the manager."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.lock = asyncio.Lock()  # FIFO: one generation at a time
        self.active: set[threading.Event] = set()  # stop events of the work in flight
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sarai-{backend.name}")


class ModelManager:
    """Owns every backend and decides what is resident."""

    def __init__(self, backends: list[Backend], budget_mb: int) -> None:
        """Register backends; nothing is loaded until first use (or warm-up)."""
        self.budget_bytes = budget_mb * MB
        self.queue_waits: deque[float] = deque(maxlen=500)  # seconds each request waited for its backend
        self._slots = {b.name: _Slot(b) for b in backends}
        self._plan_lock = asyncio.Lock()
        self._closed = False
        self.peak_rss_bytes = process_rss_bytes()

    # -- residency -------------------------------------------------------------------

    def backend(self, name: str) -> Backend:
        """Return a registered backend."""
        return self._slots[name].backend

    def waiting(self, name: str) -> bool:
        """Whether a request waits for this backend (a low-priority job then yields to it)."""
        return bool(getattr(self._slots[name].lock, "_waiters", None))

    def has(self, name: str) -> bool:
        """Whether a backend of that name is configured."""
        return name in self._slots

    def _resident_bytes(self) -> int:
        """What the models hold now: the loaded backends, plus the frameworks that stay once brought in."""
        loaded = sum(s.backend.estimate_bytes() for s in self._slots.values() if s.backend.loaded)
        return loaded + sum(s.backend.framework_bytes() for s in self._slots.values() if s.backend.loads)

    async def _ensure_loaded(self, slot: _Slot) -> None:
        backend = slot.backend
        if backend.loaded:
            return
        async with self._plan_lock:
            if backend.loaded:
                return
            need = backend.estimate_bytes()
            if need > self.budget_bytes:
                raise InsufficientMemory(backend.name, need // MB, self.budget_bytes // MB, self.budget_bytes // MB)
            # Evict the least recently used idle backends until it fits.
            candidates = sorted(
                (s for s in self._slots.values() if s is not slot and s.backend.loaded and not s.lock.locked()),
                key=lambda s: s.backend.last_used or 0.0,
            )
            while self._resident_bytes() + need > self.budget_bytes and candidates:
                victim = candidates.pop(0)
                _LOGGER.info("Unloading %s to make room for %s", victim.backend.name, backend.name)
                await self._run(victim, victim.backend.unload)
            if self._resident_bytes() + need > self.budget_bytes:
                free = self.budget_bytes - self._resident_bytes()
                raise InsufficientMemory(backend.name, need // MB, max(free, 0) // MB, self.budget_bytes // MB)
            before = process_rss_bytes()
            started = time.monotonic()
            await self._run(slot, backend.load)
            backend.loads += 1
            backend.measured_bytes = max(process_rss_bytes() - before, 0)
            self._note_rss()
            _LOGGER.info(
                "Loaded %s in %.2f s (estimated %d MB, RSS grew %d MB)",
                backend.name,
                time.monotonic() - started,
                need // MB,
                backend.measured_bytes // MB,
            )

    async def _run(self, slot: _Slot, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(slot.executor, fn)

    def _note_rss(self) -> None:
        self.peak_rss_bytes = max(self.peak_rss_bytes, process_rss_bytes())

    async def warmup(self, names: list[str]) -> None:
        """Preload backends (the cold-start mitigation); errors are logged, not raised."""
        for name in names:
            slot = self._slots.get(name)
            if slot is None:
                continue
            try:
                async with slot.lock:
                    await self._ensure_loaded(slot)
            except EngineError as err:
                _LOGGER.warning("Warm-up of %s failed: %s", name, err)

    async def unload_idle(self, max_idle_s: float) -> list[str]:
        """Unload backends unused for ``max_idle_s`` seconds; return their names."""
        now = time.monotonic()
        unloaded = []
        for slot in self._slots.values():
            b = slot.backend
            if b.loaded and not slot.lock.locked() and b.last_used is not None and now - b.last_used >= max_idle_s:
                async with slot.lock:
                    await self._run(slot, b.unload)
                unloaded.append(b.name)
        return unloaded

    async def close(self) -> None:
        """Stop the work in flight (at its next step), refuse queued work, unload everything, stop the threads."""
        if self._closed:
            return
        self._closed = True
        for slot in self._slots.values():
            for stop in list(slot.active):
                stop.set()
        for slot in self._slots.values():
            try:
                async with slot.lock:
                    if slot.backend.loaded:
                        await self._run(slot, slot.backend.unload)
            finally:
                slot.executor.shutdown(wait=True)  # idle by now: the join is immediate

    # -- work ------------------------------------------------------------------------

    async def stream(self, name: str, work: Work, timeout_s: float | None = None) -> AsyncIterator[Any]:
        """Run ``work`` on a backend in its worker thread and yield what it emits.

        Requests queue FIFO per backend. Closing the iterator (or cancelling the task
        that consumes it) sets the stop event: the work stops at its next step and the
        backend is released as soon as the thread returns.
        """
        if self._closed:
            raise EngineError("engine is shut down")
        slot = self._slots[name]
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        queued = time.monotonic()
        try:
            async with asyncio.timeout_at(deadline):
                await slot.lock.acquire()
            self.queue_waits.append(time.monotonic() - queued)
        except TimeoutError as err:
            raise RequestTimeout(f"{name} was busy for longer than {timeout_s} s", timeout_s=timeout_s) from err
        if self._closed:  # closed while this request was queued
            slot.lock.release()
            raise EngineError("engine is shut down")
        try:
            await self._ensure_loaded(slot)
            if self._closed:  # closed while the model was loading
                raise EngineError("engine is shut down")
        except BaseException:
            slot.lock.release()
            raise
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()
        slot.active.add(stop)

        def put(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # loop closed
                stop.set()

        def run() -> None:
            try:
                work(lambda item: put("item", item), stop)
            except BaseException as err:  # noqa: BLE001 - forwarded to the consumer
                put("error", err)
            else:
                put("end", None)

        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                slot.active.discard(stop)
                slot.backend.last_used = time.monotonic()
                self._note_rss()
                slot.lock.release()

        slot.backend.last_used = time.monotonic()
        fut = loop.run_in_executor(slot.executor, run)
        # If the consumer goes away (cancelled), the backend is released when the thread returns.
        fut.add_done_callback(lambda _f: release())
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        kind, value = await queue.get()
                except TimeoutError as err:
                    raise RequestTimeout(f"{name} did not finish within {timeout_s} s", timeout_s=timeout_s) from err
                if kind == "item":
                    yield value
                    continue
                await fut
                release()
                if kind == "error":
                    raise value
                return
        finally:
            stop.set()

    async def call(self, name: str, fn: Callable[[threading.Event], T], timeout_s: float | None = None) -> T:
        """Run ``fn(stop)`` on a backend and return its result."""
        result: list[T] = []

        def work(emit: Emit, stop: threading.Event) -> None:
            emit(fn(stop))

        async for item in self.stream(name, work, timeout_s):
            result.append(item)
        return result[0]

    # -- status ----------------------------------------------------------------------

    def status(self) -> list[BackendStatus]:
        """Status of every backend."""
        return [
            BackendStatus(
                name=s.backend.name,
                kind=s.backend.kind,
                loaded=s.backend.loaded,
                estimated_mb=s.backend.estimate_bytes() // MB,
                measured_mb=None if s.backend.measured_bytes is None else s.backend.measured_bytes // MB,
                last_used=s.backend.last_used,
                loads=s.backend.loads,
                busy=s.lock.locked(),
            )
            for s in self._slots.values()
        ]

    def used_bytes(self) -> int:
        """Estimated bytes of the resident backends."""
        return self._resident_bytes()
