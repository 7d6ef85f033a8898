"""SARAi engine server: one ``SaraiEngine`` behind an OpenAI-compatible HTTP API (aiohttp).

Starting it
-----------
The engine directory is run as the top-level package ``engine`` so that Home Assistant is never imported::

    SARAI_API_KEY=... PYTHONPATH=<checkout>/custom_components/sarai python -m engine.server \\
        --gguf Qwen2.5-Omni-7B-Q4_K_M.gguf [--mmproj mmproj-Qwen2.5-Omni-7B-Q8_0.gguf] [--omni Qwen2.5-Omni-7B/] \\
        [--budget-mb 12000] [--ctx 8192] [--threads N] [--host 127.0.0.1] [--port 8080] [--unix-socket PATH]

``--port 0`` picks a free port. Once listening, the server prints one JSON line on stdout,
``{"event": "listening", "host": "127.0.0.1", "port": 8080}`` (``{"event": "listening", "unix_socket": PATH}``
with ``--unix-socket``); logs go to stderr. Off loopback (a ``--host`` other than 127.0.0.1, ::1 or localhost)
it refuses to start without an API key (exit code 2). With a key (``SARAI_API_KEY``, preferred, or
``--api-key``) every request but ``GET /health`` needs ``Authorization: Bearer <key>``. SIGTERM or SIGINT stop
it gracefully: it stops listening, ends the generations in flight at their next token, unloads the models
and exits with 0. The server never forwards to SOLAR and never fetches a URL.

Endpoints
---------
- ``GET /v1/models``: ``{"object": "list", "data": [{"id", "object": "model", "owned_by": "sarai",
  "capabilities": [...]}]}``; capabilities among ``chat``, ``hear``, ``see``, ``speak``, ``video``,
  ``video_frames``. ``GET /v1/sarai/status``: the engine's status (state, budget, memory, backends,
  capabilities) and the model id. ``GET /health``: ``{"status": "ok"}`` (no key needed).
- ``POST /v1/chat/completions``: OpenAI's chat completions. ``messages`` (roles system, developer, user,
  assistant, tool) with string content or parts: ``text``; ``image_url`` with a ``data:image/...;base64,`` URL;
  ``input_audio`` ``{"data": base64 WAV, "format": "wav"}`` (or ``audio_url`` with a ``data:audio/wav`` URL);
  ``video_url`` with a ``data:video/...;base64,`` URL (vLLM's form; with
  ``"mm_processor_kwargs": {"use_audio_in_video": true}`` its audio track is heard too, time-aligned;
  ``mm_processor_kwargs.fps`` picks the frame rate, 2 by default; the first 30 s are used). ``tools``
  (function tools), ``tool_choice`` ``auto``/``none``, ``max_tokens``/``max_completion_tokens``,
  ``temperature``, ``stream``, ``response_format`` ``{"type": "json_schema", "json_schema": {"name", "schema"}}``
  (or the older ``{"type": "json_object", "schema": {...}}``). Streaming answers are SSE
  ``data: {chat.completion.chunk}`` events with ``choices[0].delta.content`` / ``delta.tool_calls``, a last
  chunk with ``finish_reason`` and ``data: [DONE]``.

  How a request is answered: without media, the conversation goes to the local text model (tools,
  structured output). With media, only the **last user message** is used, and it may hold one media part:
  an image is described (``describe_image``) with the message's text as the question; a video is watched
  (and heard) with the text as the question; an audio part alone, or with a text asking for a transcript
  ("transcribe", "dictation", "verbatim", ...), is transcribed (optional top-level ``"language"``, a SARAi
  extension); an audio part with any other instruction is answered by the hearing model (GGUF + mmproj) or,
  with the Omni checkpoint only, by the text model over the transcript. Media parts of earlier messages are
  dropped (their text is kept); tools and ``response_format`` apply to text-only requests.
- ``POST /v1/audio/speech``: ``{"model", "input" (1..1000 characters), "voice": "Chelsie"|"Ethan",
  "response_format": "wav"|"pcm"}`` -> 24 kHz mono 16-bit WAV (open-ended header) or raw PCM, streamed
  sentence by sentence (chunked transfer).
- ``POST /v1/sarai/clip`` (SARAi extension, time-aligned clips): ``{"frames": [base64 JPEG, ...] (same size,
  at most 240), "fps": 2.0, "frame_times": [seconds, ...] (optional, one per frame, non-decreasing),
  "audio": base64 WAV (optional; 16 kHz mono, other rates are resampled), "prompt": "...", "max_tokens": 256}``
  -> ``{"object": "sarai.clip", "model", "text", "frames", "fps", "frame_times", "audio_s"}``; the frames and
  the audio are given to Qwen2.5-Omni together (TMRoPE). Needs the Omni checkpoint.

Errors
------
Every error is JSON: ``{"error": {"message": short English, "type": the EngineError class, "code": its
translation key, "param": null, "placeholders": {...}}}``, never a traceback or a path. Status codes: invalid
input, unsupported modality, context overflow 400 (413 for a body over the limit, 32 MB by default; 415 for a
body that is not ``application/json``; 404/405 for unknown routes and methods); a missing or wrong key 401;
not enough memory, model missing or unusable, dependency missing 503; timeout 504; anything else 500. Headers
are sent with the first token (or the first sentence of speech), so an error before it has its status code; an
error after it ends a chat stream with a ``data: {"error": ...}`` event (and cuts a speech stream short).
``openai_client.OpenAIClient`` maps these answers back to the same ``EngineError`` classes, keys and
placeholders. A client that disconnects mid-stream stops the generation at its next token.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
from collections.abc import AsyncIterator, Awaitable, Callable
import contextlib
from dataclasses import dataclass, field
import hmac
import itertools
import json
import logging
import math
import os
from pathlib import Path
import re
import signal
import sys
import time
from typing import Any
import uuid

from aiohttp import web
import numpy as np

from . import audio as audio_mod
from .core import TEXT, EngineConfig, SaraiEngine
from .errors import EngineError, InvalidInput, RemoteAuthError, UnsupportedModality
from .media import MAX_DURATION_S, MAX_FPS, prepare_clip_bytes, validate_request
from .openai_client import error_body, error_status, validate_api_key
from .text import split_sentences
from .types import ChatDelta, ChatMessage, ChatRequest, ToolCall, ToolSpec

_LOGGER = logging.getLogger(__name__)

MB = 1024 * 1024
MAX_BODY_BYTES = 32 * MB
MAX_SPEECH_CHARS = 1000
MAX_TOKENS = 32768
MAX_CLIP_FRAMES = int(MAX_DURATION_S * MAX_FPS)
VOICES = ("Chelsie", "Ethan")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
TRANSCRIPT_REQUEST = re.compile(
    r"transcri|dictat|verbatim|word for word|what (?:is|was) said|qu[eé] (?:se )?dice|literal", re.IGNORECASE
)
DEFAULT_IMAGE_PROMPT = "Describe this image."
DEFAULT_VIDEO_PROMPT = "Describe what happens in this clip: what is seen and what is heard."

ENGINE = web.AppKey("engine", SaraiEngine)
MODEL_ID = web.AppKey("model_id", str)
BODY_LIMIT = web.AppKey("body_limit", int)
CREATED = web.AppKey("created", int)


# -- errors ------------------------------------------------------------------------------------------


def bad(message: str, *, key: str = "invalid_input", status: int = 400, **placeholders: Any) -> InvalidInput:
    """A 4xx InvalidInput with a clear message (``status`` other than 400 for 413, 415, 404, 405)."""
    err = InvalidInput(message, key=key, **placeholders)
    if status != 400:
        err.http_status = status  # type: ignore[attr-defined]
    return err


def error_response(err: EngineError) -> web.Response:
    """The JSON error answer of an engine error."""
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(err, RemoteAuthError) else None
    return web.json_response(error_body(err), status=error_status(err), headers=headers)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Engine errors, aiohttp's HTTP errors and surprises all become the JSON error format."""
    try:
        return await handler(request)
    except EngineError as err:
        _LOGGER.debug(
            "%s %s -> %s (%s): %s", request.method, request.path, type(err).__name__, err.translation_key, err
        )
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(bad(f"{exc.reason} ({request.method})", status=exc.status))
    except Exception:
        _LOGGER.exception("Unexpected error answering %s %s", request.method, request.path)
        return error_response(EngineError("internal server error"))


def auth_middleware(api_key: str) -> Any:
    """Every request but /health needs ``Authorization: Bearer <api_key>`` (compared in constant time)."""
    expected = f"Bearer {api_key}".encode("latin-1")

    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path != "/health":
            given = request.headers.get("Authorization", "").encode("latin-1", errors="replace")
            if not hmac.compare_digest(given, expected):
                _LOGGER.debug("Refused %s %s from %s: no valid API key", request.method, request.path, request.remote)
                return error_response(RemoteAuthError("invalid or missing API key", status=401))
        return await handler(request)

    return check


# -- request parsing ---------------------------------------------------------------------------------


async def read_json(request: web.Request) -> dict[str, Any]:
    """The JSON object of a request body: 415 for another content type, 413 over the limit, 400 if not JSON."""
    if request.content_type != "application/json":
        raise bad(
            f"the body must be JSON (Content-Type: application/json), not {request.content_type or 'untyped'}",
            status=415,
        )
    limit = request.app[BODY_LIMIT]
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as err:
        raise bad(f"the request body is larger than {limit // MB} MB", status=413, max_mb=limit // MB) from err
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad(f"the request body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def _int(body: dict[str, Any], names: tuple[str, ...], default: int, low: int, high: int) -> int:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise bad(f"{name} must be an integer from {low} to {high}")
        return value
    return default


def _number(
    body: dict[str, Any], name: str, default: float, low: float, high: float, *, open_low: bool = False
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{name} must be a number")
    if value < low or value > high or (open_low and value == low):
        raise bad(f"{name} must be {'more than' if open_low else 'at least'} {low:g} and at most {high:g}")
    return float(value)


def _str(value: Any, what: str, *, default: str | None = None, max_len: int = 1_000_000) -> str:
    if value is None and default is not None:
        return default
    if not isinstance(value, str):
        raise bad(f"{what} must be a string")
    if len(value) > max_len:
        raise bad(f"{what} is longer than {max_len} characters")
    return value


def b64decode(value: Any, what: str) -> bytes:
    """Strict base64 (whitespace ignored); 400 when it is not a string, not base64, or empty."""
    if not isinstance(value, str):
        raise bad(f"{what} must be a base64 string")
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad(f"{what} is not valid base64") from err
    if not data:
        raise bad(f"{what} is empty")
    return data


def decode_data_url(url: Any, expect: str, what: str) -> tuple[str, bytes]:
    """(MIME type, bytes) of a ``data:<expect>/...;base64,`` URL. Remote URLs are refused: nothing is fetched."""
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str):
        raise bad(f"{what} must hold a data: URL")
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0].lower() if ":" in url else "relative"
        raise bad(f"{what}: only data: URLs are accepted; the server never fetches {scheme} URLs")
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise bad(f"{what} is not a well-formed data: URL")
    params = [p.strip().lower() for p in header.split(";")]
    mime = params[0]
    if not mime.startswith(f"{expect}/"):
        message = f"{what} is a data: URL of type {mime or 'none'}, not {expect}"
        if expect == "video":
            raise bad(message, key="video_invalid", source="video_url")
        raise bad(message, key=f"{expect}_invalid")
    if "base64" not in params[1:]:
        raise bad(f"{what} must be a base64 data: URL")
    return mime, b64decode(payload, what)


@dataclass(slots=True)
class MediaPart:
    """One media part of the last user message."""

    kind: str  # "image", "audio" or "video"
    data: bytes
    samples: np.ndarray | None = None
    rate: int = 0


@dataclass(slots=True)
class ChatCall:
    """A validated chat completion request."""

    request: ChatRequest
    stream: bool
    media: list[MediaPart] = field(default_factory=list)
    prompt: str = ""
    language: str = "auto"
    use_audio_in_video: bool = False
    fps: float = 2.0


def _audio(data: bytes, what: str) -> MediaPart:
    samples, rate = audio_mod.decode_wav(data)
    _LOGGER.debug("%s: %.2f s of audio at %d Hz", what, samples.size / rate, rate)
    return MediaPart("audio", data, samples, rate)


def _part(part: Any, where: str) -> tuple[str, MediaPart | None]:
    """(text, media) of one content part."""
    if not isinstance(part, dict):
        raise bad(f"{where} must be an object")
    kind = part.get("type")
    if kind == "text":
        return _str(part.get("text"), f"{where}.text"), None
    if kind == "image_url":
        _, data = decode_data_url(part.get("image_url"), "image", f"{where}.image_url")
        return "", MediaPart("image", data)
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict):
            raise bad(f"{where}.input_audio must be an object with data and format")
        if spec.get("format", "wav") != "wav":
            raise bad(f"{where}.input_audio.format must be wav", key="audio_invalid")
        return "", _audio(b64decode(spec.get("data"), f"{where}.input_audio.data"), where)
    if kind == "audio_url":
        mime, data = decode_data_url(part.get("audio_url"), "audio", f"{where}.audio_url")
        if mime not in ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"):
            raise bad(f"{where}.audio_url must be a WAV file, not {mime}", key="audio_invalid")
        return "", _audio(data, where)
    if kind == "video_url":
        _, data = decode_data_url(part.get("video_url"), "video", f"{where}.video_url")
        return "", MediaPart("video", data)
    raise bad(f"{where}.type {kind!r} is not supported (text, image_url, input_audio, audio_url, video_url)")


def _content(content: Any, where: str, role: str) -> tuple[str, list[MediaPart]]:
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of parts")
    texts: list[str] = []
    media: list[MediaPart] = []
    for j, raw in enumerate(content):
        text, part = _part(raw, f"{where}.content[{j}]")
        if text:
            texts.append(text)
        if part is not None:
            if role != "user":
                raise bad(f"{where}: only user messages may hold media")
            media.append(part)
    return "\n".join(texts), media


def _tool_calls(raw: Any, where: str) -> list[ToolCall]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise bad(f"{where}.tool_calls must be a list")
    calls: list[ToolCall] = []
    for k, call in enumerate(raw):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f"{where}.tool_calls[{k}] must have a function with a name")
        args = fn.get("arguments") or "{}"
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError as err:
                raise bad(f"{where}.tool_calls[{k}].function.arguments is not JSON") from err
        if not isinstance(args, dict):
            raise bad(f"{where}.tool_calls[{k}].function.arguments must be a JSON object")
        calls.append(ToolCall(id=str(call.get("id") or f"call_{k}"), name=fn["name"], arguments=args))
    return calls


def parse_messages(raw: Any) -> tuple[list[ChatMessage], list[MediaPart], str]:
    """The messages, the media of the last user message and its text."""
    if not isinstance(raw, list) or not raw:
        raise bad("messages must be a non-empty list")
    messages: list[ChatMessage] = []
    media_of: dict[int, list[MediaPart]] = {}
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad(f"{where} must be an object")
        role = msg.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(ROLES)}")
        text, media = _content(msg.get("content"), where, role)
        calls = _tool_calls(msg.get("tool_calls"), where) if role == "assistant" else []
        if role == "user" and not text.strip() and not media:
            raise bad(f"{where} is empty")
        tool_call_id = msg.get("tool_call_id")
        if tool_call_id is not None and not isinstance(tool_call_id, str):
            raise bad(f"{where}.tool_call_id must be a string")
        name = msg.get("name")
        if name is not None and not isinstance(name, str):
            raise bad(f"{where}.name must be a string")
        messages.append(
            ChatMessage(
                "system" if role == "developer" else role,
                text,
                tool_calls=calls,
                tool_call_id=tool_call_id,
                name=name,
            )
        )
        media_of[i] = media
    last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), None)
    dropped = sum(len(m) for i, m in media_of.items() if i != last)
    if dropped:
        _LOGGER.debug("Dropped %d media parts of earlier messages", dropped)
    if last is None:
        return messages, [], ""
    return messages, media_of[last], messages[last].content


def parse_tools(raw: Any, choice: Any) -> list[ToolSpec]:
    """OpenAI function tools -> ToolSpec (none when ``tool_choice`` is ``none``)."""
    if choice not in (None, "auto", "none"):
        raise bad("tool_choice must be auto or none")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise bad("tools must be a list")
    tools: list[ToolSpec] = []
    for i, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise bad(f"tools[{i}] must be a function tool")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise bad(f"tools[{i}].function.name must be 1-64 letters, digits, _ . : or -")
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise bad(f"tools[{i}].function.parameters must be a JSON schema object")
        description = _str(fn.get("description"), f"tools[{i}].function.description", default="", max_len=10_000)
        tools.append(ToolSpec(name=name, description=description, parameters=params))
    return [] if choice == "none" else tools


def parse_response_format(raw: Any) -> dict[str, Any] | None:
    """The JSON schema asked by ``response_format`` (json_schema, or the older json_object with a schema)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise bad("response_format must be an object")
    kind = raw.get("type")
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = raw.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad("response_format.json_schema.schema must be a JSON schema object")
        return schema
    if kind == "json_object":
        schema = raw.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise bad("response_format.schema must be a JSON schema object")
        return schema
    raise bad("response_format.type must be text, json_schema or json_object")


def parse_chat(body: dict[str, Any]) -> ChatCall:
    """Validate a chat completion request."""
    messages, media, prompt = parse_messages(body.get("messages"))
    if body.get("n") not in (None, 1):
        raise bad("n must be 1")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false")
    request = ChatRequest(
        messages=messages,
        tools=parse_tools(body.get("tools"), body.get("tool_choice")),
        max_tokens=_int(body, ("max_completion_tokens", "max_tokens"), 256, 1, MAX_TOKENS),
        temperature=_number(body, "temperature", 0.7, 0.0, 2.0),
        json_schema=parse_response_format(body.get("response_format")),
        routing_mode="local",  # the server never forwards to SOLAR
    )
    mm = body.get("mm_processor_kwargs")
    mm = {} if mm is None else mm
    if not isinstance(mm, dict):
        raise bad("mm_processor_kwargs must be an object")
    with_audio = mm.get("use_audio_in_video", False)
    if not isinstance(with_audio, bool):
        raise bad("mm_processor_kwargs.use_audio_in_video must be true or false")
    return ChatCall(
        request=request,
        stream=stream,
        media=media,
        prompt=prompt,
        language=_str(body.get("language"), "language", default="auto", max_len=32),
        use_audio_in_video=with_audio,
        fps=_number(mm, "fps", 2.0, 0.0, MAX_FPS, open_low=True),
    )


# -- media work ----------------------------------------------------------------------------------------


def decode_frames(jpegs: list[bytes]) -> np.ndarray:
    """JPEG frames -> (T, H, W, 3) uint8, decoded safely; every frame must have the same size."""
    from .omni_backend import load_image

    frames = [np.asarray(load_image(data), dtype=np.uint8) for data in jpegs]
    if any(f.shape != frames[0].shape for f in frames):
        raise bad("all frames must have the same size", key="video_invalid", source="frames")
    return np.stack(frames)


def require_video(engine: SaraiEngine) -> None:
    """Refuse video before decoding it when there is no Omni checkpoint."""
    if not engine.can("video"):
        raise UnsupportedModality(
            "video is not available: configure the Omni checkpoint (omni_model)", capability="video"
        )


async def hear_and_answer(engine: SaraiEngine, part: MediaPart, prompt: str, call: ChatCall) -> str:
    """An instruction about audio: the GGUF + mmproj hears it; with Omni only, the text model reads the transcript."""
    assert part.samples is not None
    if engine.text.can_hear:
        audio16 = audio_mod.to_hearing_input(part.samples, part.rate)
        backend, max_tokens = engine.text, call.request.max_tokens
        return await engine.manager.call(
            TEXT,
            lambda stop: backend.media_chat([("audio", audio16)], prompt, max_tokens, stop),
            engine.config.request_timeout_s,
        )
    transcript = await engine.transcribe(part.samples, part.rate, call.language)
    request = ChatRequest(
        [ChatMessage("user", f"{prompt}\n\nTranscript of the audio: {transcript}")],
        max_tokens=call.request.max_tokens,
        temperature=call.request.temperature,
        routing_mode="local",
    )
    return "".join([delta.content async for delta in engine.chat(request)]).strip()


async def answer_media(engine: SaraiEngine, call: ChatCall) -> str:
    """The answer to a last user message holding one image, audio or video part."""
    if len(call.media) > 1:
        raise bad("one image, audio or video part per request")
    part, prompt, max_tokens = call.media[0], call.prompt.strip(), call.request.max_tokens
    if part.kind == "image":
        return await engine.describe_image(part.data, prompt or DEFAULT_IMAGE_PROMPT, max_tokens=max_tokens)
    if part.kind == "audio":
        assert part.samples is not None
        if not prompt or TRANSCRIPT_REQUEST.search(prompt):
            return await engine.transcribe(part.samples, part.rate, call.language)
        return await hear_and_answer(engine, part, prompt, call)
    require_video(engine)
    clip = await asyncio.to_thread(prepare_clip_bytes, part.data, call.fps, call.use_audio_in_video)
    return await engine.describe_video(clip.frames, clip.fps, clip.audio, prompt or DEFAULT_VIDEO_PROMPT, max_tokens)


# -- answers -------------------------------------------------------------------------------------------


class ChatOutput:
    """OpenAI's chat completion objects for one answer."""

    def __init__(self, model: str) -> None:
        """One id and creation time per answer."""
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.calls = 0

    def tool_calls(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        """OpenAI tool calls, numbered over the whole answer."""
        out = [
            {
                "index": self.calls + i,
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
            }
            for i, call in enumerate(calls)
        ]
        self.calls += len(calls)
        return out

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        """One SSE event."""
        obj = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    def completion(self, text: str, calls: list[ToolCall]) -> dict[str, Any]:
        """The whole answer."""
        message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
        if calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in self.tool_calls(calls)]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
        }


async def _close(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


async def _once(answer: Awaitable[str]) -> AsyncIterator[ChatDelta]:
    yield ChatDelta(content=await answer)


async def respond_chat(
    request: web.Request, deltas: AsyncIterator[ChatDelta], stream: bool, model: str
) -> web.StreamResponse:
    """Send an answer whole or as SSE. Headers go with the first delta: an error before it has its status code.

    Closing ``deltas`` (always, also when the client went away) sets the engine's stop event.
    """
    out = ChatOutput(model)
    try:
        delta = await anext(deltas, None)
        if not stream:
            text, calls = "", []
            while delta is not None:
                text += delta.content
                calls += delta.tool_calls
                delta = await anext(deltas, None)
            return web.json_response(out.completion(text, calls))
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await resp.prepare(request)
        try:
            await resp.write(out.chunk({"role": "assistant", "content": ""}))
            while delta is not None:
                if delta.content:
                    await resp.write(out.chunk({"content": delta.content}))
                if delta.tool_calls:
                    await resp.write(out.chunk({"tool_calls": out.tool_calls(delta.tool_calls)}))
                delta = await anext(deltas, None)
            await resp.write(out.chunk({}, "tool_calls" if out.calls else "stop"))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except EngineError as err:  # after the answer started: an error event instead of [DONE]
            _LOGGER.warning("The answer failed after it started: %s", err)
            with contextlib.suppress(ConnectionError):
                await resp.write(f"data: {json.dumps(error_body(err))}\n\n".encode())
                await resp.write_eof()
        except ConnectionError:
            _LOGGER.info("The client went away mid-stream: generation stopped")
        return resp
    finally:
        await _close(deltas)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    call = parse_chat(await read_json(request))
    engine = request.app[ENGINE]
    deltas: AsyncIterator[ChatDelta]
    if call.media:
        deltas = _once(answer_media(engine, call))
    else:
        deltas = aiter(engine.chat(call.request))
    return await respond_chat(request, deltas, call.stream, request.app[MODEL_ID])


async def sarai_prefill(request: web.Request) -> web.Response:
    """POST /v1/sarai/prefill: load the text model and evaluate a chat request's static prefix (its system
    message and tools) ahead of the first turn; nothing is generated. Answers how many tokens are cached."""
    call = parse_chat(await read_json(request))
    engine = request.app[ENGINE]
    await engine.warmup(prefill=call.request)
    cached = engine.text.last_prefill_tokens if engine.remote is None else 0
    return web.json_response({"object": "sarai.prefill", "tokens": cached})


async def audio_speech(request: web.Request) -> web.StreamResponse:
    """POST /v1/audio/speech: WAV or PCM, streamed sentence by sentence."""
    body = await read_json(request)
    text = _str(body.get("input"), "input").strip()
    if not text:
        raise bad("input is empty", key="tts_empty")
    if len(text) > MAX_SPEECH_CHARS:
        raise bad(
            f"input has {len(text)} characters (at most {MAX_SPEECH_CHARS})",
            key="tts_too_long",
            length=len(text),
            max_length=MAX_SPEECH_CHARS,
        )
    voices = {v.lower(): v for v in VOICES}
    voice = voices.get(_str(body.get("voice"), "voice", default=VOICES[0]).lower())
    if voice is None:
        raise bad(f"voice must be one of {', '.join(VOICES)}")
    fmt = body.get("response_format", "wav")
    if fmt not in ("wav", "pcm"):
        raise bad("response_format must be wav or pcm")
    engine = request.app[ENGINE]
    sentences = split_sentences(text, final=True)[0]
    pcm = await engine.speak(sentences[0], voice)  # an error before the first sentence has its status code
    resp = web.StreamResponse(
        headers={
            "Content-Type": "audio/wav" if fmt == "wav" else "audio/pcm",
            "X-Sample-Rate": str(audio_mod.SPEAK_RATE),
        }
    )
    await resp.prepare(request)
    try:
        if fmt == "wav":
            await resp.write(audio_mod.wav_stream_header())
        for sentence in sentences[1:]:
            if pcm:
                await resp.write(pcm)
            pcm = await engine.speak(sentence, voice)
        if pcm:
            await resp.write(pcm)
        await resp.write_eof()
    except ConnectionError:
        _LOGGER.info("The client went away mid-speech: speech stopped")
    except EngineError as err:  # cut the stream short: the client sees an incomplete answer, not a silent end
        _LOGGER.warning("Speech failed after it started: %s", err)
        if request.transport is not None:
            request.transport.close()
    return resp


async def sarai_clip(request: web.Request) -> web.Response:
    """POST /v1/sarai/clip: time-aligned frames + audio -> text."""
    body = await read_json(request)
    raw_frames = body.get("frames")
    if not isinstance(raw_frames, list) or not raw_frames:
        raise bad("frames must be a non-empty list of base64 JPEG images")
    if len(raw_frames) > MAX_CLIP_FRAMES:
        raise bad(f"at most {MAX_CLIP_FRAMES} frames")
    fps = _number(body, "fps", 2.0, 0.0, MAX_FPS, open_low=True)
    validate_request(len(raw_frames) / fps, fps)
    times = body.get("frame_times")
    if times is not None:
        if (
            not isinstance(times, list)
            or len(times) != len(raw_frames)
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in times)
            or any(b < a for a, b in itertools.pairwise(times))
            or min(times) < 0
        ):
            raise bad("frame_times must hold one non-decreasing time (s) per frame")
    jpegs = [b64decode(f, f"frames[{i}]") for i, f in enumerate(raw_frames)]
    audio16 = None
    if body.get("audio") is not None:
        samples, rate = audio_mod.decode_wav(b64decode(body["audio"], "audio"))
        audio16 = audio_mod.to_hearing_input(samples, rate)
    prompt = _str(body.get("prompt"), "prompt", default=DEFAULT_VIDEO_PROMPT, max_len=20_000) or DEFAULT_VIDEO_PROMPT
    max_tokens = _int(body, ("max_tokens",), 256, 1, MAX_TOKENS)
    engine = request.app[ENGINE]
    require_video(engine)
    frames = await asyncio.to_thread(decode_frames, jpegs)
    text = await engine.describe_video(frames, fps, audio16, prompt, max_tokens)
    return web.json_response(
        {
            "object": "sarai.clip",
            "model": request.app[MODEL_ID],
            "text": text,
            "frames": len(jpegs),
            "fps": fps,
            "frame_times": times if times is not None else [round(i / fps, 3) for i in range(len(jpegs))],
            "audio_s": 0.0 if audio16 is None else round(audio16.size / audio_mod.HEAR_RATE, 3),
        }
    )


async def models(request: web.Request) -> web.Response:
    """GET /v1/models."""
    engine = request.app[ENGINE]
    entry = {
        "id": request.app[MODEL_ID],
        "object": "model",
        "created": request.app[CREATED],
        "owned_by": "sarai",
        "capabilities": engine.capabilities,
    }
    return web.json_response({"object": "list", "data": [entry]})


async def status(request: web.Request) -> web.Response:
    """GET /v1/sarai/status."""
    return web.json_response(
        {"object": "sarai.status", "model": request.app[MODEL_ID], **request.app[ENGINE].status().as_dict()}
    )


async def health(request: web.Request) -> web.Response:
    """GET /health (no key needed)."""
    return web.json_response({"status": "ok"})


def create_app(
    engine: SaraiEngine, *, model_id: str = "sarai", api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES
) -> web.Application:
    """The aiohttp application serving ``engine`` (the caller owns the engine and closes it)."""
    middlewares: list[Any] = [errors_middleware]
    if api_key:
        middlewares.append(auth_middleware(api_key))
    app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
    app[ENGINE] = engine
    app[MODEL_ID] = model_id
    app[BODY_LIMIT] = max_body_bytes
    app[CREATED] = int(time.time())
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/sarai/status", status)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/audio/speech", audio_speech)
    app.router.add_post("/v1/sarai/clip", sarai_clip)
    app.router.add_post("/v1/sarai/prefill", sarai_prefill)
    return app


# -- command line ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.server", description="SARAi engine server (OpenAI-compatible HTTP API)."
    )
    parser.add_argument("--gguf", required=True, help="text GGUF (Qwen2.5-Omni, arch qwen2vl)")
    parser.add_argument("--mmproj", help="mmproj GGUF: hearing and seeing in llama.cpp")
    parser.add_argument("--omni", help="Qwen2.5-Omni transformers checkpoint directory: speech, video")
    parser.add_argument("--budget-mb", type=int, default=12000, help="memory budget for the models (MB)")
    parser.add_argument("--ctx", type=int, default=8192, help="context size (tokens)")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: physical cores)")
    parser.add_argument("--omni-dtype", default="auto", help="Omni checkpoint dtype (auto, float32, bfloat16)")
    parser.add_argument("--omni-int8", action="store_true", help="int8-quantise the Omni checkpoint on CPU")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request and backend")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (0: pick a free one)")
    parser.add_argument("--unix-socket", help="listen on this Unix socket (mode 0600) instead of TCP")
    parser.add_argument("--api-key", help="API key (prefer the SARAI_API_KEY environment variable)")
    parser.add_argument("--model-id", help="model id in /v1/models (default: the GGUF's file name)")
    parser.add_argument("--max-body-mb", type=int, default=MAX_BODY_BYTES // MB, help="largest request body (MB)")
    parser.add_argument("--warmup", action="store_true", help="load the text model at start")
    parser.add_argument("--cache-dir", help="keep prefilled prompt states here across restarts")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _announce(message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


async def serve(args: argparse.Namespace, api_key: str | None, stop: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or until ``stop`` is set, when given: then no signal handlers are installed).

    0 after a graceful stop, 1 when the engine or the socket cannot start.
    """
    config = EngineConfig(
        gguf_model=args.gguf,
        mmproj_model=args.mmproj,
        omni_model=args.omni,
        memory_budget_mb=args.budget_mb,
        n_ctx=args.ctx,
        n_threads=args.threads,
        omni_dtype=args.omni_dtype,
        omni_int8=args.omni_int8,
        routing_mode="local",
        request_timeout_s=args.request_timeout,
        cache_dir=args.cache_dir,
    )
    try:
        engine = SaraiEngine(config)
    except EngineError as err:
        print(f"sarai engine server: {err}", file=sys.stderr)
        return 1
    model_id = args.model_id or Path(args.gguf).stem
    app = create_app(engine, model_id=model_id, api_key=api_key, max_body_bytes=args.max_body_mb * MB)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        if args.unix_socket:
            site: web.BaseSite = web.UnixSite(runner, args.unix_socket)
            await site.start()
            os.chmod(args.unix_socket, 0o600)
            where: dict[str, Any] = {"unix_socket": args.unix_socket}
        else:
            site = web.TCPSite(runner, args.host, args.port)
            await site.start()
            where = {"host": args.host, "port": runner.addresses[0][1]}
    except OSError as err:
        print(f"sarai engine server: cannot listen: {err}", file=sys.stderr)
        await runner.cleanup()
        await engine.close()
        return 1
    _announce({"event": "listening", **where})
    _LOGGER.info(
        "SARAi engine server listening on %s (model %s, capabilities %s, API key %s)",
        where,
        model_id,
        ", ".join(engine.capabilities),
        "required" if api_key else "not required",
    )
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if stop is None else ()
    stop = stop or asyncio.Event()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    warm = loop.create_task(engine.warmup(), name="sarai warm-up") if args.warmup else None
    try:
        await stop.wait()
    finally:
        _LOGGER.info("Stopping: no new requests, generations in flight end at their next token")
        for sig in signals:
            loop.remove_signal_handler(sig)
        if warm is not None:
            warm.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warm
        await site.stop()
        await engine.close()
        await runner.cleanup()
        _LOGGER.info("Stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, refuse unsafe settings (exit code 2), serve."""
    args = build_parser().parse_args(argv)
    api_key = args.api_key or os.environ.get("SARAI_API_KEY") or None
    try:
        validate_api_key(api_key)
    except InvalidInput:
        print("sarai engine server: the API key holds spaces or control characters", file=sys.stderr)
        return 2
    if not args.unix_socket and args.host not in LOOPBACK and not api_key:
        print(
            f"sarai engine server: refusing to listen on {args.host} without an API key; "
            "set SARAI_API_KEY (or --api-key), or listen on 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    if not 0 <= args.port <= 65535:
        print(f"sarai engine server: invalid port {args.port}", file=sys.stderr)
        return 2
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(serve(args, api_key))


if __name__ == "__main__":  # pragma: no cover - run as a child process
    sys.exit(main())
