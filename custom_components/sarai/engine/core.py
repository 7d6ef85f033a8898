"""SaraiEngine: the one object the Home Assistant platforms talk to."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
import importlib
import importlib.util
import logging
import os
import threading
import time
from typing import Any

import aiohttp
import numpy as np

from . import audio as audio_mod
from .errors import (
    ContextOverflow,
    DependencyMissing,
    EngineError,
    InsufficientMemory,
    ModelCorrupt,
    ModelMissing,
    RemoteAuthError,
    RemoteError,
    UnsupportedModality,
)
from .events import DEFAULT_LABELS, event_prompt, event_schema, parse_events, video_question
from .grammar import with_safe_schema
from .history import window
from .llama_backend import LlamaBackend
from .manager import Backend, ModelManager, process_rss_bytes
from .media import Clip, prepare_clip
from .models import MB
from .omni_backend import OmniBackend, load_image, transcribe_prompt
from .remote import SERVER, WORKER, InferenceUnavailable, RemoteInference
from .router import CircuitBreaker, Decision, RoutingRules, decide
from .solar import SolarClient
from .text import TextSanitizer, clean_delta, sanitize_text, then_end
from .tools import ToolCallStreamParser
from .types import BackendStatus, ChatDelta, ChatMessage, ChatRequest, EngineStatus
from .worker import WorkerProcess

_LOGGER = logging.getLogger(__name__)

TEXT = "text"
OMNI = "omni"


PACKAGE_NAMES = {"llama_cpp": "llama-cpp-python"}  # a module's package, where the names differ
# What the Omni checkpoint needs (torchvision: the Qwen2.5-Omni processor's video part imports it).
OMNI_MODULES = ["torch", "torchvision", "transformers"]


def require_packages(modules: list[str], *, load: bool = True) -> None:
    """Import each module once (cheap when already imported); a missing one is DependencyMissing, at setup
    rather than as an ImportError at the first turn. ``load=False`` only finds them: the worker placement
    keeps native code (libllama, torch) out of this process."""
    for module in modules:
        try:
            if load:
                importlib.import_module(module)
            elif importlib.util.find_spec(module) is None:
                raise ImportError(module)
        except ImportError as err:
            raise DependencyMissing(PACKAGE_NAMES.get(module, module)) from err


def physical_cores() -> int:
    """Physical CPU cores (llama.cpp runs fastest with one thread per core; hyper-threads do not help)."""
    cores: set[tuple[str, str]] = set()
    physical = core = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    physical = value.strip()
                elif key == "core id":
                    core = value.strip()
                    cores.add((physical, core))
    except OSError:
        pass
    return len(cores) or os.cpu_count() or 1


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs, as plain values."""

    gguf_model: str | None
    mmproj_model: str | None = None
    omni_model: str | None = None
    memory_budget_mb: int = 12000
    n_ctx: int = 8192
    n_threads: int | None = None
    omni_dtype: str = "auto"
    omni_int8: bool = False
    solar_url: str | None = None
    solar_api_key: str | None = None
    routing_mode: str = "auto"
    breaker_threshold: int = 3
    breaker_cooldown_s: float = 60.0
    request_timeout_s: float = 120.0
    solar_timeout_s: float = 30.0
    rules: RoutingRules = field(default_factory=RoutingRules)
    placement: str = "in_process"  # "in_process", "worker" (a supervised child process) or "server"
    cache_dir: str | None = None  # where prefilled prompt states are kept across restarts (None: memory only)
    server_url: str | None = None  # placement "server": an OpenAI-compatible inference server
    server_api_key: str | None = None
    worker_startup_timeout_s: float = 180.0

    def worker_args(self) -> list[str]:
        """The engine server's arguments for this configuration (placement "worker")."""
        assert self.gguf_model is not None
        args = ["--gguf", self.gguf_model, "--budget-mb", str(self.memory_budget_mb), "--ctx", str(self.n_ctx)]
        args += ["--request-timeout", str(self.request_timeout_s)]
        if self.mmproj_model:
            args += ["--mmproj", self.mmproj_model]
        if self.omni_model:
            args += ["--omni", self.omni_model, "--omni-dtype", self.omni_dtype]
            if self.omni_int8:
                args.append("--omni-int8")
        if self.n_threads:
            args += ["--threads", str(self.n_threads)]
        if self.cache_dir:
            args += ["--cache-dir", self.cache_dir]
        return args


@dataclass(slots=True)
class RouteInfo:
    """The route a turn took, and why (shown in debug data, diagnostics and a sensor).

    The engine decides it and fills it in while the answer streams; callers only read it.
    """

    route: str = "local"
    reason: str = ""
    fallback: str | None = None
    agent: str | None = None
    started: float = field(default_factory=time.monotonic)
    duration_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON view."""
        return {
            "route": self.route,
            "reason": self.reason,
            "fallback": self.fallback,
            "agent": self.agent,
            "duration_s": self.duration_s,
        }


class ChatTurn:
    """One streamed answer: iterate it for the deltas; ``route`` says where it went and why."""

    def __init__(self, route: RouteInfo, stream: AsyncIterator[ChatDelta]) -> None:
        """Wrap the engine's stream."""
        self.route = route
        self._stream = stream

    def __aiter__(self) -> AsyncIterator[ChatDelta]:
        """The deltas."""
        return self._stream


class SaraiEngine:
    """Model manager + router + SOLAR client behind one async API of plain values."""

    def __init__(
        self,
        config: EngineConfig,
        session: aiohttp.ClientSession | None = None,
        on_remote_auth_error: Callable[[], None] | None = None,
    ) -> None:
        """Validate the configured files (raises ModelMissing / ModelCorrupt) and that the packages the backends
        need are importable (raises DependencyMissing), then build the backends.

        Placement "worker": the same checks, but the models load in a supervised child process (worker.py);
        placement "server": no local model at all, an OpenAI-compatible server answers (``async_start`` probes
        what it serves).
        """
        self.config = config
        self.remote: RemoteInference | None = None
        backends: list[Backend] = []
        if config.placement == SERVER:
            if session is None or not config.server_url:
                raise EngineError("the server placement needs a server URL and an HTTP session")
            self.remote = RemoteInference(
                session, url=config.server_url, api_key=config.server_api_key, timeout_s=config.request_timeout_s
            )
        else:
            if not config.gguf_model:
                raise ModelMissing("no text GGUF is configured", path="")
            modules = ["llama_cpp"] + (OMNI_MODULES if config.omni_model else [])
            require_packages(modules, load=config.placement != WORKER)
            threads = config.n_threads or physical_cores()
            self.text = LlamaBackend(
                TEXT, config.gguf_model, config.n_ctx, threads, config.mmproj_model, cache_dir=config.cache_dir
            )
            backends.append(self.text)
            if config.omni_model:
                backends.append(OmniBackend(OMNI, config.omni_model, config.omni_dtype, config.omni_int8))
        self.manager = ModelManager(backends, config.memory_budget_mb)
        if config.placement == WORKER:
            if session is None:
                raise EngineError("the worker placement needs an HTTP session")
            worker = WorkerProcess(
                config.worker_args(),
                startup_timeout_s=config.worker_startup_timeout_s,
                on_crash_loop=self._crash_loop,
            )
            self.remote = RemoteInference(
                session, worker=worker, capabilities=self._local_capabilities(), timeout_s=config.request_timeout_s
            )
        self.on_crash_loop: Callable[[int], None] | None = None
        self._prefill_lock = asyncio.Lock()
        self.solar: SolarClient | None = None
        if config.solar_url and session is not None:
            self.solar = SolarClient(
                session, config.solar_url, config.solar_api_key, read_timeout=config.solar_timeout_s
            )
        self.breaker = CircuitBreaker(config.breaker_threshold, config.breaker_cooldown_s)
        self.last_route: RouteInfo | None = None
        self._on_auth_error = on_remote_auth_error
        self._remote_down_logged = False

    # -- capabilities -------------------------------------------------------------------

    def _crash_loop(self, crashes: int) -> None:
        if self.on_crash_loop is not None:
            self.on_crash_loop(crashes)

    async def async_start(self) -> None:
        """Placement "server": ask the server what it serves (raises InferenceUnavailable when down)."""
        if self.remote is not None:
            await self.remote.probe()

    @property
    def placement(self) -> str:
        """Where the local model runs: in_process, worker or server."""
        return self.config.placement

    @property
    def capabilities(self) -> list[str]:
        """What the configured models (or the inference server) can do."""
        if self.remote is not None and self.remote.placement == SERVER:
            caps = list(self.remote.capabilities)
        else:
            caps = self._local_capabilities()
        if self.solar is not None:
            caps.append("remote")
        return caps

    def _local_capabilities(self) -> list[str]:
        caps = ["chat"]
        omni = self.manager.has(OMNI)
        if omni or self.text.can_hear:
            caps.append("hear")
        if omni or self.text.can_see:
            caps.append("see")
        if omni:
            caps += ["speak", "video"]
        elif self.text.can_see:
            caps.append("video_frames")
        return caps

    def can(self, capability: str) -> bool:
        """Whether a capability is available."""
        return capability in self.capabilities

    def _require(self, capability: str) -> None:
        if not self.can(capability):
            need = (
                "the Omni checkpoint (omni_model)"
                if capability in ("speak", "video")
                else "the mmproj or the Omni checkpoint"
            )
            raise UnsupportedModality(f"{capability} is not available: configure {need}", capability=capability)

    # -- lifecycle ----------------------------------------------------------------------

    async def warmup(self, prefill: ChatRequest | None = None) -> None:
        """Preload the text model (cold-start mitigation); a worker starts and loads it.

        ``prefill``: an assistant's prompt (its system message and tools): its static prefix is then
        evaluated, or restored from the prompt-state cache, so that the first turn evaluates only its own words.
        """
        if self.remote is not None:
            await self.remote.warmup()
            if prefill is not None:
                await self.remote.prefill(prefill)
            return
        async with self._prefill_lock:  # one warm-up job at a time: a job never counts as a waiting user
            await self.manager.warmup([TEXT])
            if prefill is not None:
                await self.prefill(prefill)

    async def prefill(self, request: ChatRequest) -> int:
        """Evaluate and keep the static prefix of ``request``'s prompt (system prompt + tools), generating nothing.

        A low-priority job: skipped when the text model is not loaded or a request waits for it, and
        stopped between two small chunks as soon as one does (what was evaluated stays in the KV cache
        for it). No timeout: it yields instead. Errors are logged, not raised. Returns the tokens of the
        prefix now cached (0: skipped, interrupted or failed). Placements "worker" and "server": 0 here;
        ``warmup(prefill=...)`` sends the prompt to a SARAi server, which prefills it in its own engine.
        """
        if self.remote is not None or not self.text.loaded:
            return 0
        text = self.text

        def waiting() -> bool:
            return self.manager.waiting(TEXT)

        if waiting():
            return 0
        try:
            cached = await self.manager.call(TEXT, lambda stop: text.prefill(request, stop, waiting))
        except EngineError as err:
            _LOGGER.warning("Prefill of the prompt prefix failed: %s", err)
            return 0
        _LOGGER.debug("Prefill: %d prompt tokens cached", cached)
        return cached

    async def close(self) -> None:
        """Unload every backend and stop worker threads (and the worker process)."""
        await self.manager.close()
        if self.remote is not None:
            await self.remote.close()

    async def unload_idle(self, max_idle_s: float) -> list[str]:
        """Unload backends idle for ``max_idle_s``."""
        return await self.manager.unload_idle(max_idle_s)

    # -- text ----------------------------------------------------------------------------

    async def chat_local(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        """Stream a local answer; Qwen <tool_call> blocks come out as ToolCall values (when tools were offered).

        A JSON schema is checked before the request is queued; the text is sanitized (text.py).
        """
        request = with_safe_schema(request)
        sanitizer = TextSanitizer(break_runs=request.json_schema is None)
        tools = bool(request.tools)
        if self.remote is not None:  # the worker or server parses tool calls; sanitized here all the same
            remote = self.remote.chat(request)
            assert isinstance(remote, AsyncGenerator)
            try:
                async for item in then_end(remote):
                    delta = clean_delta(item or ChatDelta(), sanitizer, tools=tools, final=item is None)
                    if delta is not None:
                        yield delta
            finally:
                await remote.aclose()
            return
        llama = self.manager.backend(TEXT)
        assert isinstance(llama, LlamaBackend)

        def work(emit: Callable[[Any], None], stop: threading.Event) -> None:
            llama.chat(request, emit, stop)

        parser = ToolCallStreamParser()
        stream = self.manager.stream(TEXT, work, self.config.request_timeout_s)
        assert isinstance(stream, AsyncGenerator)
        try:
            async for text in then_end(stream):  # the text, then None at its end
                raw = parser.feed(text) if text is not None else parser.finish()
                delta = clean_delta(raw, sanitizer, tools=tools, final=text is None)
                if delta is not None:
                    yield delta
        finally:
            await stream.aclose()

    def decide(self, text: str, mode: str | None = None) -> Decision:
        """Routing decision for a user text (pure; see router.py)."""
        return decide(text, mode or self.config.routing_mode, self.config.rules, self.solar is not None)

    def chat(self, request: ChatRequest) -> ChatTurn:
        """Decide the route from the last user message and stream the answer, with fallback both ways.

        An explicit routing prefix (``piensa:``, ``think:``) is removed before the model sees the text.
        Turns of an assistant (``request.agent`` set) become ``last_route``; internal work does not.
        """
        last_user = next(
            (i for i in range(len(request.messages) - 1, -1, -1) if request.messages[i].role == "user"), None
        )
        text = request.messages[last_user].content if last_user is not None else ""
        decision = self.decide(text, request.routing_mode)
        if last_user is not None and decision.text != text.strip():
            messages = list(request.messages)
            messages[last_user] = replace(messages[last_user], content=decision.text)
            request = replace(request, messages=messages)
        route = RouteInfo(route=decision.route, reason=decision.reason, agent=request.agent)
        if request.agent is not None:
            self.last_route = route
        _LOGGER.debug(
            "Chat for %s: %d messages, %d tools, route %s (%s)",
            request.agent or "internal work",
            len(request.messages),
            len(request.tools),
            route.route,
            route.reason,
        )
        return ChatTurn(route, self._chat(request, route))

    async def _chat(self, request: ChatRequest, route: RouteInfo) -> AsyncIterator[ChatDelta]:
        try:
            if route.route == "remote":
                async for delta in self._chat_remote_with_fallback(request, route):
                    yield delta
            else:
                async for delta in self._chat_local_with_fallback(request, route):
                    yield delta
        finally:
            route.duration_s = round(time.monotonic() - route.started, 4)
            _LOGGER.debug("Chat answered on %s in %.3f s (fallback: %s)", route.route, route.duration_s, route.fallback)

    async def _remote(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        """Stream from SOLAR, keeping the circuit breaker, the "down" log and the reauth hook up to date.

        The JSON schema is checked and the history windowed as for a local answer; the text is sanitized.
        """
        assert self.solar is not None
        request = replace(with_safe_schema(request), messages=window(request.messages, request.history_turns))
        sanitizer = TextSanitizer(break_runs=request.json_schema is None)
        try:
            async for delta in self.solar.chat_stream(request):
                clean = clean_delta(delta, sanitizer)
                if clean is not None:
                    yield clean
        except RemoteError as err:
            if isinstance(err, RemoteAuthError) and self._on_auth_error is not None:
                self._on_auth_error()
            if self.breaker.failure(str(err)) or not self._remote_down_logged:
                _LOGGER.warning("SOLAR server failed: %s", err)
                self._remote_down_logged = True
            raise
        tail = sanitizer.finish()
        if tail:
            yield ChatDelta(content=tail)
        self.breaker.success()
        if self._remote_down_logged:
            _LOGGER.info("SOLAR server is answering again")
            self._remote_down_logged = False

    async def _chat_remote_with_fallback(self, request: ChatRequest, route: RouteInfo) -> AsyncIterator[ChatDelta]:
        if not self.breaker.allow():
            route.route, route.fallback = "local", f"circuit breaker open: {self.breaker.last_error}"
            async for delta in self.chat_local(request):
                yield delta
            return
        started = False
        try:
            async for delta in self._remote(request):
                started = True
                yield delta
        except RemoteError as err:
            if started:  # generation is not idempotent: no second, different answer
                raise
            route.route, route.fallback = "local", f"remote failed: {err}"
            async for delta in self.chat_local(request):
                yield delta

    async def _chat_local_with_fallback(self, request: ChatRequest, route: RouteInfo) -> AsyncIterator[ChatDelta]:
        started = False
        try:
            async for delta in self.chat_local(request):
                started = True
                yield delta
        except (InsufficientMemory, ContextOverflow, ModelMissing, ModelCorrupt, InferenceUnavailable) as err:
            mode = request.routing_mode or self.config.routing_mode
            if started or self.solar is None or not self.breaker.allow() or mode == "local":
                raise
            route.route, route.fallback = "remote", f"local failed: {err}"
            async for delta in self._remote(request):
                yield delta

    # -- hearing, seeing, speaking, video -----------------------------------------------

    async def transcribe(self, samples: np.ndarray, rate: int, language: str) -> str:
        """Speech (any rate, mono float) -> text; > 30 s is chunked."""
        self._require("hear")
        audio16 = audio_mod.to_hearing_input(samples, rate)
        if self.remote is not None:
            pieces = [await self.remote.transcribe(chunk, language) for chunk in audio_mod.chunks_30s(audio16)]
            return sanitize_text(" ".join(p for p in pieces if p)).strip()
        text, omni = self.text, self.manager.backend(OMNI) if self.manager.has(OMNI) else None
        name = TEXT if text.can_hear else OMNI  # the GGUF + mmproj hears without loading transformers
        parts: list[str] = []
        for chunk in audio_mod.chunks_30s(audio16):

            def run(stop: threading.Event, c: np.ndarray = chunk) -> str:
                if text.can_hear:
                    return text.media_chat([("audio", c)], transcribe_prompt(language), 128, stop)
                assert isinstance(omni, OmniBackend)
                return omni.transcribe(c, language, stop)

            parts.append(await self.manager.call(name, run, self.config.request_timeout_s))
        heard = " ".join(p for p in parts if p).strip()
        _LOGGER.debug(
            "Heard %.2f s of audio on %s: %d characters", audio16.size / audio_mod.HEAR_RATE, name, len(heard)
        )
        return heard

    async def describe_image(self, image: bytes, prompt: str, max_tokens: int = 128) -> str:
        """Image bytes + question -> text."""
        self._require("see")
        img = load_image(image)
        if self.remote is not None:
            return sanitize_text(await self.remote.describe_image(img, prompt, max_tokens)).strip()
        if self.text.can_see:
            return await self.manager.call(
                TEXT,
                lambda stop: self.text.media_chat([("image", img)], prompt, max_tokens, stop),
                self.config.request_timeout_s,
            )
        omni = self.manager.backend(OMNI)
        assert isinstance(omni, OmniBackend)
        return await self.manager.call(
            OMNI, lambda stop: omni.describe_image(img, prompt, stop, max_tokens), self.config.request_timeout_s
        )

    async def describe_video(
        self, frames: np.ndarray, fps: float, audio16: np.ndarray | None, prompt: str, max_tokens: int = 256
    ) -> str:
        """Frames + audio (TMRoPE) -> text."""
        self._require("video")
        if self.remote is not None:
            return sanitize_text(await self.remote.describe_video(frames, fps, audio16, prompt, max_tokens)).strip()
        omni = self.manager.backend(OMNI)
        assert isinstance(omni, OmniBackend)
        return await self.manager.call(
            OMNI,
            lambda stop: omni.describe_video(frames, fps, audio16, prompt, stop, max_tokens),
            self.config.request_timeout_s,
        )

    async def speak(self, text: str, voice: str) -> bytes:
        """Text -> 24 kHz mono 16-bit PCM."""
        self._require("speak")
        if self.remote is not None:
            return await self.remote.speak(text, voice)
        omni = self.manager.backend(OMNI)
        assert isinstance(omni, OmniBackend)
        started = time.monotonic()
        wav = await self.manager.call(OMNI, lambda stop: omni.speak(text, voice, stop), self.config.request_timeout_s)
        _LOGGER.debug(
            "Spoke %d characters as %.2f s of audio in %.2f s",
            len(text),
            wav.size / audio_mod.SPEAK_RATE,
            time.monotonic() - started,
        )
        return audio_mod.float_to_pcm16(wav)

    async def analyze_clip(
        self,
        source: str,
        *,
        prompt: str = "",
        duration_s: float = 6.0,
        fps: float = 2.0,
        with_audio: bool = True,
        labels: list[str] | None = None,
        timeout_s: float = 15.0,
        max_pixels: int = 448 * 448,
    ) -> dict[str, Any]:
        """A clip (file or live URL) -> summary + validated events, with timings; plain values only."""
        frames_only = not self.can("video")
        if frames_only and not self.can("video_frames"):
            self._require("video")
        labels = [label.strip() for label in (labels or DEFAULT_LABELS) if label.strip()]
        t0 = time.monotonic()
        clip: Clip = await asyncio.to_thread(
            prepare_clip, source, duration_s, fps, with_audio and not frames_only, max_pixels, timeout_s
        )
        t1 = time.monotonic()
        if frames_only:
            if with_audio:
                clip.warnings.append("no Omni checkpoint: frames only through the GGUF + mmproj, audio not analysed")
            summary = await self._describe_frames(clip, video_question(prompt, labels, clip.duration_s, False))
            route = "gguf_frames_only"
        else:
            summary = await self.describe_video(
                clip.frames,
                clip.fps,
                clip.audio,
                video_question(prompt, labels, clip.duration_s, clip.audio is not None),
            )
            route = "omni_video_audio" if clip.audio is not None else "omni_video_only"
        t2 = time.monotonic()
        events, warnings, extract_route = await self._extract_events(summary, labels, clip.duration_s)
        t3 = time.monotonic()
        return {
            "summary": summary,
            "events": events,
            "frames": len(clip.frame_times),
            "frame_times": [round(t, 3) for t in clip.frame_times],
            "fps": clip.fps,
            "audio_s": clip.audio_s,
            "duration_s": round(clip.duration_s, 3),
            "model": "qwen2.5-omni",
            "route": route,
            "events_route": extract_route,
            "warnings": clip.warnings + warnings,
            "timings": {
                "prepare_s": round(t1 - t0, 4),
                "describe_s": round(t2 - t1, 4),
                "events_s": round(t3 - t2, 4),
                "total_s": round(t3 - t0, 4),
            },
        }

    async def _describe_frames(self, clip: Clip, question: str, max_frames: int = 4) -> str:
        """Frames-only analysis on the GGUF + mmproj: a few frames spread over the clip, with their times."""
        from PIL import Image

        picks = np.linspace(0, len(clip.frame_times) - 1, num=min(max_frames, len(clip.frame_times))).round()
        indices = sorted({int(i) for i in picks})
        images = [("image", Image.fromarray(clip.frames[i])) for i in indices]
        times = ", ".join(f"{clip.frame_times[i]:.1f} s" for i in indices)
        prompt = f"{question} The images are frames taken at {times}."
        if self.remote is not None:
            return sanitize_text(await self.remote.describe_frames([img for _k, img in images], prompt, 256)).strip()
        return await self.manager.call(
            TEXT, lambda stop: self.text.media_chat(images, prompt, 256, stop), self.config.request_timeout_s
        )

    async def _extract_events(
        self, summary: str, labels: list[str], duration_s: float
    ) -> tuple[list[dict[str, Any]], list[str], str]:
        """Structured events from the description: JSON-schema constrained, validated, retried once."""
        schema = event_schema(labels)
        messages = event_prompt(summary, labels, duration_s)
        route = "local"
        for attempt in (1, 2):
            turn = self.chat(ChatRequest(messages=list(messages), max_tokens=384, temperature=0.0, json_schema=schema))
            text = ""
            try:
                async for delta in turn:
                    text += delta.content
            except EngineError as err:
                _LOGGER.warning("Event extraction failed (attempt %d): %s", attempt, err)
                continue
            finally:
                route = turn.route.route
            try:
                return parse_events(text, labels, duration_s), [], route
            except ValueError as err:
                _LOGGER.warning("Event JSON rejected (attempt %d): %s", attempt, err)
                messages.append(ChatMessage("assistant", text))
                messages.append(ChatMessage("user", f"Invalid: {err}. Answer again with valid JSON only."))
        return [], ["the model did not return valid events; returned the summary only"], route

    # -- status ---------------------------------------------------------------------------

    def status(self) -> EngineStatus:
        """A serialisable snapshot (with a worker or server: its last reported state, and the worker's RSS)."""
        if self.remote is not None:
            return self._remote_status(self.remote)
        backends = self.manager.status()
        if any(b.busy for b in backends):
            state = "busy"
        elif any(b.loaded for b in backends):
            state = "ready"
        else:
            state = "idle"
        return EngineStatus(
            state=state,
            budget_mb=self.config.memory_budget_mb,
            used_estimated_mb=self.manager.used_bytes() // MB,
            rss_mb=process_rss_bytes() // MB,
            backends=backends,
            capabilities=self.capabilities,
        )

    def _remote_status(self, remote: RemoteInference) -> EngineStatus:
        reported = remote.last_status
        backends = [BackendStatus(**b) for b in reported.get("backends", []) if isinstance(b, dict)]
        state = str(reported.get("state", "idle"))
        if remote.worker is not None and not remote.worker.alive:
            state = "idle"
        return EngineStatus(
            state=state if state in ("idle", "ready", "busy") else "idle",
            budget_mb=self.config.memory_budget_mb,
            used_estimated_mb=int(reported.get("used_estimated_mb", 0)),
            rss_mb=(process_rss_bytes() + remote.rss_bytes()) // MB,
            backends=backends,
            capabilities=self.capabilities,
        )


__all__ = ["ChatMessage", "ChatTurn", "EngineConfig", "EngineError", "RouteInfo", "SaraiEngine"]
