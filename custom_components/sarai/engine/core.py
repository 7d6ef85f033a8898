"""SaraiEngine: the one object the Home Assistant platforms talk to."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
import logging
import threading
import time
from typing import Any

import aiohttp
import numpy as np

from . import audio as audio_mod
from .errors import (
    ContextOverflow,
    EngineError,
    InsufficientMemory,
    ModelCorrupt,
    ModelMissing,
    RemoteAuthError,
    RemoteError,
    UnsupportedModality,
)
from .events import DEFAULT_LABELS, event_prompt, event_schema, parse_events, video_question
from .llama_backend import LlamaBackend
from .manager import Backend, ModelManager, process_rss_bytes
from .media import Clip, prepare_clip
from .models import MB
from .omni_backend import OmniBackend, load_image, transcribe_prompt
from .router import CircuitBreaker, Decision, RoutingRules, decide
from .solar import SolarClient
from .tools import ToolCallStreamParser
from .types import ChatDelta, ChatMessage, ChatRequest, EngineStatus

_LOGGER = logging.getLogger(__name__)

TEXT = "text"
OMNI = "omni"


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine needs, as plain values."""

    gguf_model: str
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


@dataclass(slots=True)
class RouteInfo:
    """The route a turn took, and why (shown in debug data, diagnostics and a sensor)."""

    route: str = "local"
    reason: str = ""
    fallback: str | None = None
    started: float = field(default_factory=time.monotonic)
    duration_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON view."""
        return {"route": self.route, "reason": self.reason, "fallback": self.fallback, "duration_s": self.duration_s}


class SaraiEngine:
    """Model manager + router + SOLAR client behind one async API of plain values."""

    def __init__(
        self,
        config: EngineConfig,
        session: aiohttp.ClientSession | None = None,
        on_remote_auth_error: Callable[[], None] | None = None,
    ) -> None:
        """Validate the configured files (raises ModelMissing / ModelCorrupt) and build backends."""
        self.config = config
        self.text = LlamaBackend(TEXT, config.gguf_model, config.n_ctx, config.n_threads, config.mmproj_model)
        backends: list[Backend] = [self.text]
        if config.omni_model:
            backends.append(OmniBackend(OMNI, config.omni_model, config.omni_dtype, config.omni_int8))
        self.manager = ModelManager(backends, config.memory_budget_mb)
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

    @property
    def capabilities(self) -> list[str]:
        """What the configured models can do."""
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
        if self.solar is not None:
            caps.append("remote")
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

    async def warmup(self) -> None:
        """Preload the text model (cold-start mitigation)."""
        await self.manager.warmup([TEXT])

    async def close(self) -> None:
        """Unload every backend and stop worker threads."""
        await self.manager.close()

    async def unload_idle(self, max_idle_s: float) -> list[str]:
        """Unload backends idle for ``max_idle_s``."""
        return await self.manager.unload_idle(max_idle_s)

    # -- text ----------------------------------------------------------------------------

    async def chat_local(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        """Stream a local answer; Qwen <tool_call> blocks come out as ToolCall values."""
        llama = self.manager.backend(TEXT)
        assert isinstance(llama, LlamaBackend)

        def work(emit: Callable[[Any], None], stop: threading.Event) -> None:
            llama.chat(request, emit, stop)

        parser = ToolCallStreamParser()
        stream = self.manager.stream(TEXT, work, request.timeout_s)
        assert isinstance(stream, AsyncGenerator)
        try:
            async for text in stream:
                delta = parser.feed(text)
                if delta.content or delta.tool_calls:
                    yield delta
        finally:
            await stream.aclose()
        tail = parser.finish()
        if tail.content or tail.tool_calls:
            yield tail

    def decide(self, text: str) -> Decision:
        """Routing decision for a user text (pure; see router.py)."""
        return decide(text, self.config.routing_mode, self.config.rules, self.solar is not None)

    async def chat(self, request: ChatRequest, route: RouteInfo) -> AsyncIterator[ChatDelta]:
        """Stream an answer on the route in ``route`` (filled by ``decide``), with fallback both ways."""
        self.last_route = route
        try:
            if route.route == "remote":
                async for delta in self._chat_remote_with_fallback(request, route):
                    yield delta
            else:
                async for delta in self._chat_local_with_fallback(request, route):
                    yield delta
        finally:
            route.duration_s = round(time.monotonic() - route.started, 4)

    async def _remote(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        """Stream from SOLAR, keeping the circuit breaker, the "down" log and the reauth hook up to date."""
        assert self.solar is not None
        try:
            async for delta in self.solar.chat_stream(request):
                yield delta
        except RemoteError as err:
            if isinstance(err, RemoteAuthError) and self._on_auth_error is not None:
                self._on_auth_error()
            if self.breaker.failure(str(err)) or not self._remote_down_logged:
                _LOGGER.warning("SOLAR server failed: %s", err)
                self._remote_down_logged = True
            raise
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
        except (InsufficientMemory, ContextOverflow, ModelMissing, ModelCorrupt) as err:
            if started or self.solar is None or not self.breaker.allow() or self.config.routing_mode == "local":
                raise
            route.route, route.fallback = "remote", f"local failed: {err}"
            async for delta in self._remote(request):
                yield delta

    # -- hearing, seeing, speaking, video -----------------------------------------------

    async def transcribe(self, samples: np.ndarray, rate: int, language: str) -> str:
        """Speech (any rate, mono float) -> text; > 30 s is chunked."""
        self._require("hear")
        audio16 = audio_mod.to_hearing_input(samples, rate)
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
        return " ".join(p for p in parts if p).strip()

    async def describe_image(self, image: bytes, prompt: str, max_tokens: int = 128) -> str:
        """Image bytes + question -> text."""
        self._require("see")
        img = load_image(image)
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
        omni = self.manager.backend(OMNI)
        assert isinstance(omni, OmniBackend)
        wav = await self.manager.call(OMNI, lambda stop: omni.speak(text, voice, stop), self.config.request_timeout_s)
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
        return await self.manager.call(
            TEXT, lambda stop: self.text.media_chat(images, prompt, 256, stop), self.config.request_timeout_s
        )

    async def _extract_events(
        self, summary: str, labels: list[str], duration_s: float
    ) -> tuple[list[dict[str, Any]], list[str], str]:
        """Structured events from the description: JSON-schema constrained, validated, retried once."""
        decision = self.decide(summary)
        schema = event_schema(labels)
        messages = event_prompt(summary, labels, duration_s)
        route = RouteInfo(route=decision.route, reason=decision.reason)
        for attempt in (1, 2):
            route = RouteInfo(route=decision.route, reason=decision.reason)
            request = ChatRequest(messages=list(messages), max_tokens=384, temperature=0.0, json_schema=schema)
            text = ""
            try:
                async for delta in self.chat(request, route):
                    text += delta.content
            except EngineError as err:
                _LOGGER.warning("Event extraction failed (attempt %d): %s", attempt, err)
                continue
            try:
                return parse_events(text, labels, duration_s), [], route.route
            except ValueError as err:
                _LOGGER.warning("Event JSON rejected (attempt %d): %s", attempt, err)
                messages.append(ChatMessage("assistant", text))
                messages.append(ChatMessage("user", f"Invalid: {err}. Answer again with valid JSON only."))
        return [], ["the model did not return valid events; returned the summary only"], route.route

    # -- status ---------------------------------------------------------------------------

    def status(self) -> EngineStatus:
        """A serialisable snapshot."""
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


__all__ = ["ChatMessage", "EngineConfig", "EngineError", "RouteInfo", "SaraiEngine"]
