"""Inference outside Home Assistant's process: a supervised worker (SARAi's engine server as a child
process) or an existing OpenAI-compatible server (SARAi's engine server, llama.cpp's llama-server, vLLM).

The manager's job stays with the caller (SaraiEngine): routing, SOLAR fallback, capability checks. Here:
one request per model at a time in arrival order (an ``asyncio.Lock`` is FIFO), a deadline on every call,
and a crash or hang of the worker turned into a translated error while the worker restarts by itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
import logging
import time
from typing import Any

import aiohttp
import numpy as np

from .audio import HEAR_RATE, float_to_pcm16, wav_bytes
from .errors import EngineError, RemoteError, RequestTimeout
from .media import encode_mp4
from .openai_client import OpenAIClient, encode_jpeg
from .types import ChatDelta, ChatMessage, ChatRequest
from .worker import WorkerProcess, WorkerUnavailable

_LOGGER = logging.getLogger(__name__)

WORKER = "worker"
SERVER = "server"


class InferenceUnavailable(RemoteError):
    """The inference server (not SOLAR) cannot be reached or failed."""

    translation_key = "inference_unavailable"


class RemoteInference:
    """The local model's capabilities, served by a worker process or a server."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        worker: WorkerProcess | None = None,
        url: str | None = None,
        api_key: str | None = None,
        capabilities: Sequence[str] | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        """Either a ``worker`` (capabilities known from the model files) or a server ``url`` (probed)."""
        if (worker is None) == (url is None):
            raise ValueError("give a worker or a url")
        self.placement = WORKER if worker is not None else SERVER
        self.worker = worker
        self._session = session
        self._url = url
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._client: OpenAIClient | None = None
        self._lock = asyncio.Lock()
        self.capabilities: list[str] = list(capabilities or [])
        self.server_kind: str | None = "sarai" if worker is not None else None
        self.model: str | None = None
        self.supports_tools = True
        self.last_status: dict[str, Any] = {}
        self.requests = 0

    # -- connection --------------------------------------------------------------------------

    def _new_client(self, base_url: str, api_key: str | None) -> OpenAIClient:
        return OpenAIClient(
            self._session,
            base_url,
            api_key,
            read_timeout=self._timeout_s,
            total_timeout=self._timeout_s,
            label="SARAi worker" if self.worker is not None else "inference server",
        )

    async def _connect(self) -> OpenAIClient:
        if self.worker is not None:
            base = await self.worker.ensure()
            if self._client is None or self._client.base_url != base:
                self._client = self._new_client(base, self.worker.api_key)
            return self._client
        if self._client is None:
            assert self._url is not None
            self._client = self._new_client(self._url, self._api_key)
        return self._client

    async def probe(self) -> list[str]:
        """Ask the server what it serves (a worker serves what its model files can do)."""
        if self.worker is not None:
            return self.capabilities
        client = await self._connect()
        try:
            caps = await client.probe()
        except RemoteError as err:
            raise InferenceUnavailable(f"the inference server cannot be reached: {err}") from err
        self.server_kind, self.model = client.kind, client.model
        self.supports_tools = client.supports_tools
        if "see" in caps and "video" not in caps:
            caps = {*caps, "video_frames"}  # a few frames of a clip, as image parts
        order = ["chat", "hear", "see", "speak", "video", "video_frames"]
        self.capabilities = [c for c in order if c in caps]
        return self.capabilities

    async def _failed(self, err: BaseException) -> EngineError:
        """The error to raise for a failed call: the worker's crash, a hang, or the server's own error."""
        if self.worker is not None:
            if await self.worker.wait_exit(1.0):
                return WorkerUnavailable(f"the worker stopped during the request: {err}")
            if isinstance(err, (TimeoutError, RequestTimeout)):
                _LOGGER.warning("The SARAi worker did not answer in %s s: restarting it", self._timeout_s)
                await self.worker.restart()
                return WorkerUnavailable("the worker hung and was restarted")
        if isinstance(err, EngineError) and not isinstance(err, RemoteError):
            return err  # the server's own translated error (bad input, context overflow, ...)
        if isinstance(err, RemoteError) and err.translation_key not in ("remote_error", "remote_protocol"):
            return err
        return InferenceUnavailable(f"the inference server failed: {err}")

    async def _call[T](self, what: str, work: Callable[[OpenAIClient], Any]) -> T:
        """One request at a time, in arrival order, with a deadline that covers the wait and the work."""
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._lock:
                    client = await self._connect()
                    self.requests += 1
                    result: T = await work(client)
                    return result
        except (EngineError, TimeoutError, aiohttp.ClientError) as err:
            _LOGGER.debug("%s on the %s failed: %s", what, self.placement, err)
            raise await self._failed(err) from err

    # -- capabilities ------------------------------------------------------------------------

    async def chat(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        """Stream an answer (raw deltas: the caller parses tool calls and sanitizes)."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._lock:
                    client = await self._connect()
                    self.requests += 1
                    async for delta in client.chat_stream(request):
                        yield delta
        except (EngineError, TimeoutError, aiohttp.ClientError) as err:
            _LOGGER.debug("chat on the %s failed after %.2f s: %s", self.placement, time.monotonic() - started, err)
            raise await self._failed(err) from err

    async def transcribe(self, audio16: np.ndarray, language: str) -> str:
        """16 kHz mono float audio -> text (one WAV ``input_audio`` part)."""
        wav = wav_bytes(float_to_pcm16(audio16), HEAR_RATE)
        return await self._call("transcribe", lambda c: c.transcribe(wav, language))

    async def describe_image(self, image: Any, prompt: str, max_tokens: int) -> str:
        """An RGB PIL image (already brought into the model's limits) -> text."""
        jpeg = encode_jpeg(np.asarray(image.convert("RGB")))
        return await self._call("describe_image", lambda c: c.describe_image(jpeg, prompt, max_tokens))

    async def describe_video(
        self, frames: np.ndarray, fps: float, audio16: np.ndarray | None, prompt: str, max_tokens: int
    ) -> str:
        """Frames + audio, time-aligned (the engine asks only a server that said "video").

        SARAi's engine server (worker, add-on) takes them as they are (its ``/v1/sarai/clip`` extension); any
        other server (vLLM) gets the clip as one small MP4 in a ``video_url`` part, with
        ``mm_processor_kwargs.use_audio_in_video`` when it has sound.
        """
        if self.server_kind == "sarai":
            return await self._call(
                "describe_video", lambda c: c.describe_clip(frames, fps, audio16, prompt, max_tokens=max_tokens)
            )
        with_audio = audio16 is not None and audio16.size > 0
        video = await asyncio.to_thread(encode_mp4, frames, fps, audio16 if with_audio else None)
        return await self._call(
            "describe_video",
            lambda c: c.describe_video(video, prompt, with_audio=with_audio, max_tokens=max_tokens),
        )

    async def describe_frames(self, images: Sequence[Any], prompt: str, max_tokens: int) -> str:
        """A few RGB PIL frames in one message (llama-server, vLLM: image parts) -> text."""
        media = [("image", encode_jpeg(np.asarray(img.convert("RGB")))) for img in images]
        request = ChatRequest([ChatMessage("user", prompt)], max_tokens=max_tokens, temperature=0.0)
        return await self._call("describe_frames", lambda c: c._answer(request, media))

    async def speak(self, text: str, voice: str) -> bytes:
        """Text -> 24 kHz mono 16-bit PCM."""

        async def work(client: OpenAIClient) -> bytes:
            return b"".join([chunk async for chunk in client.speech(text, voice)])

        return await self._call("speak", work)

    async def refresh_status(self) -> dict[str, Any]:
        """The SARAi server's engine status (memory, backends), kept for the sensors; {} for other servers."""
        if self.server_kind != "sarai" or (self.worker is not None and not self.worker.alive):
            return self.last_status
        try:
            async with asyncio.timeout(5):
                client = await self._connect()
                self.last_status = await client.sarai_status()
        except (EngineError, TimeoutError, aiohttp.ClientError) as err:
            _LOGGER.debug("status of the %s failed: %s", self.placement, err)
        return self.last_status

    async def prefill(self, request: ChatRequest) -> int:
        """Prefill an assistant's static prompt in the SARAi server (worker or add-on); 0 for other servers."""
        if self.server_kind != "sarai":
            return 0
        try:
            return int(await self._call("prefill", lambda c: c.prefill(request)))
        except EngineError as err:
            _LOGGER.warning("Prefill in the %s failed: %s", self.placement, err)
            return 0

    async def warmup(self) -> None:
        """Start the worker (and let it load its text model) ahead of the first turn."""
        if self.worker is not None:
            try:
                await self.worker.ensure()
            except EngineError as err:
                _LOGGER.warning("The SARAi worker did not start: %s", err)

    def rss_bytes(self) -> int:
        """The worker's resident memory (0 for a server on another machine)."""
        return self.worker.rss_bytes() if self.worker is not None else 0

    def as_dict(self) -> dict[str, Any]:
        """Diagnostics view (no key, no URL credentials)."""
        out: dict[str, Any] = {
            "placement": self.placement,
            "server_kind": self.server_kind,
            "model": self.model,
            "capabilities": self.capabilities,
            "requests": self.requests,
        }
        if self.worker is not None:
            out["worker"] = {
                "pid": self.worker.pid,
                "starts": self.worker.starts,
                "restarts": self.worker.restarts,
                "last_exit": self.worker.last_exit,
                "rss_mb": self.worker.rss_bytes() // (1024 * 1024),
            }
        return out

    async def close(self) -> None:
        """Stop the worker; nothing is left behind."""
        if self.worker is not None:
            await self.worker.close()
