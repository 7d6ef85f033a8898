"""One client for every OpenAI-compatible server: SARAi's engine server, llama.cpp's ``llama-server``,
llama-cpp-python's server, vLLM, and SOLAR (which is any of them).

It speaks ``/v1/models``, ``/v1/chat/completions`` (SSE streaming, tool calls, image / audio / video parts,
``response_format``), ``/v1/audio/speech`` and SARAi's ``/v1/sarai/clip`` extension, and it carries the error
format of ``server.py`` both ways: ``error_body`` / ``error_status`` build it, ``sarai_error`` turns it back
into the same ``EngineError`` class with the same translation key and placeholders.

Timeouts: ``connect_timeout`` (TCP + TLS), ``first_byte_timeout`` (from sending a request to the first byte of
its answer's body), ``read_timeout`` (between two chunks of a streamed answer), ``total_timeout`` (the whole
request). The API key goes into the ``Authorization`` header only, never into a message or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
from collections.abc import AsyncIterator, Sequence
import io
import json
import re
from typing import Any
import uuid

import aiohttp
import numpy as np
import yarl

from .errors import (
    ContextOverflow,
    DependencyMissing,
    EngineError,
    InsufficientMemory,
    InvalidInput,
    ModelCorrupt,
    ModelMissing,
    RemoteAuthError,
    RemoteError,
    RemoteProtocolError,
    RequestTimeout,
    UnsupportedModality,
)
from .types import ChatDelta, ChatMessage, ChatRequest, ToolCall

MAX_URL_LENGTH = 2048
MAX_KEY_LENGTH = 4096
MAX_ERROR_MESSAGE = 500
MAX_PLACEHOLDER = 200
ALL_CAPABILITIES = ("chat", "hear", "see", "speak", "video", "video_frames")

# -- validation helpers (used by the config flow and the server) ---------------------------------


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F or 0x80 <= ord(c) < 0xA0 for c in text)


def validate_url(url: str) -> str:
    """An OpenAI-compatible server's base URL: http(s), a host, no credentials in the query, no control characters.

    Raises InvalidInput (key ``invalid_url``) otherwise; returns the URL without surrounding spaces.
    """
    url = url.strip()
    if not url or len(url) > MAX_URL_LENGTH or _has_control(url) or any(c.isspace() for c in url):
        raise InvalidInput("the server URL is empty, too long or holds control characters or spaces", key="invalid_url")
    try:
        parsed = yarl.URL(url)
        host = parsed.host
        _port = parsed.port  # raises on a port that is not a number or out of range
    except (ValueError, TypeError) as err:
        raise InvalidInput(f"the server URL cannot be parsed: {err}", key="invalid_url") from err
    if parsed.scheme not in ("http", "https") or not host:
        raise InvalidInput(
            f"the server URL must be http(s)://host[:port][/path], not {parsed.scheme!r}", key="invalid_url"
        )
    return url


def validate_api_key(key: str | None) -> str | None:
    """An API key that can go into an Authorization header: printable, no spaces or control characters."""
    if not key:
        return None
    if len(key) > MAX_KEY_LENGTH or _has_control(key) or any(c.isspace() for c in key) or not key.isprintable():
        raise InvalidInput("the API key holds spaces or control characters", key="invalid_api_key")
    try:
        key.encode("latin-1")
    except UnicodeEncodeError as err:
        raise InvalidInput("the API key holds characters an HTTP header cannot carry", key="invalid_api_key") from err
    return key


def redact_url(url: str) -> str:
    """A URL safe to show: no user, password, query or fragment."""
    try:
        parsed = yarl.URL(url)
    except ValueError, TypeError:
        return "**REDACTED**"
    if not parsed.host:
        return "**REDACTED**"
    clean = parsed.with_user(None).with_password(None).with_query(None).with_fragment(None)
    return str(clean)


# -- the error format on the wire -----------------------------------------------------------------

_PATH = re.compile(r"(?<![\w.:])/(?:[^\s/'\"<>]+/)+([^\s/'\"<>]*)")
_STATUS_BY_CLASS: tuple[tuple[type[EngineError], int], ...] = (
    (RemoteAuthError, 401),
    (InvalidInput, 400),
    (UnsupportedModality, 400),
    (ContextOverflow, 400),
    (InsufficientMemory, 503),
    (ModelMissing, 503),
    (ModelCorrupt, 503),
    (DependencyMissing, 503),
    (RequestTimeout, 504),
)
_TYPED_ATTRIBUTES = {
    "InsufficientMemory": ("backend", "needed_mb", "available_mb", "budget_mb"),
    "DependencyMissing": ("package",),
}


def safe_message(text: str) -> str:
    """An error message fit for the wire: its first line, absolute paths reduced to file names, bounded."""
    line = (text.strip().splitlines() or [""])[0]
    return _PATH.sub(lambda m: m.group(1) or "<path>", line)[:MAX_ERROR_MESSAGE]


def error_status(err: EngineError) -> int:
    """The HTTP status of an engine error (an ``http_status`` attribute set by the server wins)."""
    status = getattr(err, "http_status", None)
    if isinstance(status, int):
        return status
    for cls, code in _STATUS_BY_CLASS:
        if isinstance(err, cls):
            return code
    return 500


def error_body(err: EngineError) -> dict[str, Any]:
    """The OpenAI-style error body: short English message, the class, the translation key, the placeholders."""
    return {
        "error": {
            "message": safe_message(str(err)) or type(err).__name__,
            "type": type(err).__name__,
            "code": err.translation_key,
            "param": None,
            "placeholders": {k: safe_message(v)[:MAX_PLACEHOLDER] for k, v in err.placeholders.items()},
        }
    }


def _error_classes() -> dict[str, type[EngineError]]:
    """Every EngineError class defined so far, by name (the first of a name wins)."""
    found: dict[str, type[EngineError]] = {"EngineError": EngineError}
    todo: list[type[EngineError]] = [EngineError]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.setdefault(sub.__name__, sub)
            todo.append(sub)
    return found


def sarai_error(status: int, body: Any) -> EngineError | None:
    """The EngineError a SARAi server described in ``body`` (``{"error": {"type", "code", ...}}``), else None."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return None
    cls = _error_classes().get(str(err.get("type")))
    code = err.get("code")
    if cls is None or not isinstance(code, str) or not code:
        return None
    raw = err.get("placeholders")
    placeholders = (
        {str(k)[:64]: str(v)[:MAX_PLACEHOLDER] for k, v in raw.items() if str(k) != "path"}
        if isinstance(raw, dict)
        else {}
    )
    message = str(err.get("message") or cls.__name__)[:MAX_ERROR_MESSAGE]
    rebuilt = cls.__new__(cls)
    EngineError.__init__(rebuilt, message, key=code, **placeholders)
    for attr in _TYPED_ATTRIBUTES.get(cls.__name__, ()):
        value = placeholders.get(attr, "")
        setattr(rebuilt, attr, int(value) if value.isdigit() else value)
    if status >= 400 and status != error_status(rebuilt):
        rebuilt.http_status = status  # type: ignore[attr-defined]
    return rebuilt


def _body_text(body: Any, raw: str) -> str:
    """What a non-SARAi server said about an error, short."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:200]
        if err:
            return str(err)[:200]
    return raw[:200]


# -- media on the wire ------------------------------------------------------------------------------

Media = tuple[str, bytes]  # ("image", JPEG/PNG bytes), ("audio", WAV bytes), ("video", MP4/WebM/MKV bytes)


def image_mime(data: bytes) -> str:
    """The MIME type of image bytes, from their magic number (JPEG when unknown)."""
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data.startswith(b"BM"):
        return "image/bmp"
    return "image/jpeg"


def video_mime(data: bytes) -> str:
    """The MIME type of video bytes (MP4 unless it is Matroska/WebM)."""
    return "video/webm" if data.startswith(b"\x1a\x45\xdf\xa3") else "video/mp4"


def media_part(kind: str, data: bytes) -> dict[str, Any]:
    """One OpenAI content part for media bytes."""
    b64 = base64.b64encode(data).decode("ascii")
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": f"data:{image_mime(data)};base64,{b64}"}}
    if kind == "audio":
        return {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}
    if kind == "video":
        return {"type": "video_url", "video_url": {"url": f"data:{video_mime(data)};base64,{b64}"}}
    raise InvalidInput(f"unknown media kind {kind!r}")


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """An RGB uint8 frame as JPEG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def chat_message(msg: ChatMessage) -> dict[str, Any]:
    """A ChatMessage as an OpenAI message."""
    out: dict[str, Any] = {"role": msg.role, "content": msg.content}
    if msg.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
            for c in msg.tool_calls
        ]
    if msg.role == "tool":
        out["tool_call_id"] = msg.tool_call_id
    if msg.name:
        out["name"] = msg.name
    return out


def transcribe_instruction(language: str) -> str:
    """The instruction that asks a hearing model (and SARAi's server) for a transcript."""
    return f"Transcribe this audio exactly, in its language ({language}). Output only the transcript."


# -- SSE ----------------------------------------------------------------------------------------------


class SSEParser:
    """Server-sent events, fed in arbitrary byte chunks: returns the ``data`` of each complete event.

    Lines end in LF, CRLF or CR (also split across chunks); ``:`` lines are comments; multi-line data is joined
    with LF; ``event``/``id``/``retry`` fields are ignored; an ``error:`` field (some servers' error events)
    becomes ``{"error": ...}`` data. ``finish()`` returns an event left without its closing blank line.
    """

    def __init__(self) -> None:
        """Start empty."""
        self._buffer = ""
        self._data: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, chunk: bytes) -> list[str]:
        """Parse a chunk; the data of the events it completes."""
        self._buffer += self._decoder.decode(chunk)
        events: list[str] = []
        while True:
            match = re.search(r"\r\n|\r|\n", self._buffer)
            if match is None or (match.group() == "\r" and match.end() == len(self._buffer)):
                break  # no complete line (a trailing CR may be the first half of CRLF)
            line, self._buffer = self._buffer[: match.start()], self._buffer[match.end() :]
            self._line(line, events)
        return events

    def finish(self) -> list[str]:
        """The end of the stream: the last line and a pending event, if any."""
        events: list[str] = []
        tail = self._buffer + self._decoder.decode(b"", final=True)
        self._buffer = ""
        if tail.strip("\r\n"):
            self._line(tail.rstrip("\r\n"), events)
        self._line("", events)
        return events

    def _line(self, line: str, events: list[str]) -> None:
        if not line:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "error":
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = value
            self._data.append(json.dumps({"error": parsed}))


# -- the client ---------------------------------------------------------------------------------------


class OpenAIClient:
    """Talks to one OpenAI-compatible server; the aiohttp session is the caller's.

    ``remote_errors``: every failure is a ``RemoteError`` (SOLAR: the caller then answers locally); otherwise
    a SARAi server's typed errors come back as the same ``EngineError`` classes.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str | None = None,
        *,
        connect_timeout: float = 5.0,
        first_byte_timeout: float | None = None,
        read_timeout: float = 30.0,
        total_timeout: float = 180.0,
        verify_ssl: bool = True,
        label: str = "inference server",
        remote_errors: bool = False,
    ) -> None:
        """Configure; nothing is sent until a call."""
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else f"{base}/v1"
        self.root_url = self.base_url.removesuffix("/v1")
        self.label = label
        self.model: str | None = None
        self.kind: str | None = None  # "sarai", "llama.cpp", "vllm" or "openai" once probed
        self.capabilities: set[str] | None = None
        self.supports_tools = True  # False: the server said its chat template ignores tools (llama-server)
        self._session = session
        self._api_key = api_key
        self._connect = connect_timeout
        self._first_byte = first_byte_timeout if first_byte_timeout is not None else read_timeout
        self._read = read_timeout
        self._total = total_timeout
        self._ssl: bool = verify_ssl
        self._remote_errors = remote_errors
        self._legacy_json_mode = False  # the server refused the standard json_schema response_format

    # -- plumbing --------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._api_key:
            try:
                validate_api_key(self._api_key)
            except InvalidInput as err:  # a key stored before keys were checked: ask for a new one
                raise RemoteAuthError(f"the stored {self.label} API key cannot be sent in a header", status=0) from err
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _timeout(self) -> aiohttp.ClientTimeout:
        # The waits after connecting are timed here (first byte, between chunks, total), not by aiohttp.
        return aiohttp.ClientTimeout(total=None, connect=self._connect, sock_connect=self._connect, sock_read=None)

    def _remote(self, message: str, **placeholders: Any) -> RemoteError:
        return RemoteError(message, **placeholders)

    def _map_error(self, status: int, body: Any, raw: str) -> EngineError:
        """The error for an HTTP error answer (or an ``error`` event; status 0)."""
        if status in (401, 403):
            return RemoteAuthError(f"{self.label} rejected the API key (HTTP {status})", status=status)
        typed = sarai_error(status, body)
        if typed is not None and not self._remote_errors:
            return typed
        detail = _body_text(body, raw)
        if status == 0:
            return self._remote(f"{self.label} error: {detail}")
        return self._remote(f"{self.label} answered HTTP {status}: {detail}", status=status)

    async def _raise_for(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        raw = (await resp.read())[:4096].decode("utf-8", errors="replace")
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        raise self._map_error(resp.status, body, raw)

    def _transport(self, err: BaseException, what: str) -> RemoteError:
        if isinstance(err, TimeoutError):
            return self._remote(f"{self.label} {what}: no answer in time (TimeoutError)")
        return self._remote(f"{self.label} {what}: {err or type(err).__name__}")

    async def _request_json(
        self, method: str, url: str, payload: Any = None, *, wait_s: float | None = None, optional: bool = False
    ) -> Any:
        """One request answered with JSON. ``optional``: None instead of an error for a non-2xx (but 401/403)."""
        try:
            async with asyncio.timeout(wait_s if wait_s is not None else min(self._first_byte, self._total)):
                async with self._session.request(
                    method, url, json=payload, headers=self._headers(), timeout=self._timeout(), ssl=self._ssl
                ) as resp:
                    if optional and resp.status >= 400 and resp.status not in (401, 403):
                        return None
                    await self._raise_for(resp)
                    try:
                        return await resp.json(content_type=None)
                    except ValueError as err:
                        if optional:
                            return None
                        raise RemoteProtocolError(f"{self.label} did not answer JSON at {yarl.URL(url).path}") from err
        except (aiohttp.ClientError, TimeoutError) as err:
            raise self._transport(err, "cannot be reached") from err

    async def _read_chunk(self, resp: aiohttp.ClientResponse, wait: float) -> bytes:
        if wait <= 0:
            raise TimeoutError
        return await asyncio.wait_for(resp.content.readany(), wait)

    async def _stream_body(self, resp: aiohttp.ClientResponse, started: float) -> AsyncIterator[bytes]:
        """The body in chunks: the first within the first-byte timeout, the next ones within the read timeout."""
        loop = asyncio.get_running_loop()
        end = started + self._total
        first = True
        while True:
            now = loop.time()
            wait = min((started + self._first_byte) if first else (now + self._read), end) - now
            chunk = await self._read_chunk(resp, wait)
            if not chunk:
                return
            first = False
            yield chunk

    async def _post(self, path: str, payload: dict[str, Any]) -> tuple[aiohttp.ClientResponse, float]:
        """Send a POST and wait for its answer's headers (within the first-byte timeout).

        Generation requests go on a connection of their own (``Connection: close``): llama-server closes a
        connection after a streamed answer, and aiohttp never retries a POST on a pooled connection the server
        already closed ("Server disconnected"). A new loopback or LAN connection costs nothing next to a turn.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        headers = {**self._headers(), "Connection": "close"}
        async with asyncio.timeout(min(self._first_byte, self._total)):
            resp = await self._session.post(
                f"{self.base_url}{path}", json=payload, headers=headers, timeout=self._timeout(), ssl=self._ssl
            )
        return resp, started

    # -- discovery -------------------------------------------------------------------------------

    async def _models(self) -> list[dict[str, Any]]:
        data = await self._request_json("GET", f"{self.base_url}/models")
        try:
            models = [dict(m) for m in data["data"]]
            for model in models:
                model["id"] = str(model["id"])
        except (KeyError, TypeError, ValueError) as err:
            raise RemoteProtocolError(f"/v1/models is not OpenAI-compatible: {err}") from err
        if models and self.model is None:
            self.model = models[0]["id"]
        return models

    async def list_models(self) -> list[str]:
        """GET /v1/models: health check and model discovery (the first model is used)."""
        return [m["id"] for m in await self._models()]

    async def probe(self) -> set[str]:
        """What the server can do: ``chat``, ``hear``, ``see``, ``speak``, ``video``, ``video_frames``.

        SARAi's server says it (``/v1/sarai/status``); llama.cpp's ``llama-server`` reports its mmproj's
        ``modalities`` in ``/props``; a model listed with ``capabilities`` says it there; a vLLM model whose id
        contains "Omni" is assumed to hear, see and watch video; anything else chats.
        """
        caps: set[str]
        status = await self._request_json("GET", f"{self.base_url}/sarai/status", optional=True)
        if isinstance(status, dict) and isinstance(status.get("capabilities"), list):
            self.kind, caps = "sarai", {str(c) for c in status["capabilities"]}
            if isinstance(status.get("model"), str):
                self.model = status["model"]
        else:
            props = await self._request_json("GET", f"{self.root_url}/props", optional=True)
            if isinstance(props, dict) and isinstance(props.get("modalities"), dict):
                modalities = props["modalities"]
                self.kind, caps = "llama.cpp", {"chat"}
                template = props.get("chat_template_caps")
                if isinstance(template, dict) and template.get("supports_tools") is False:
                    self.supports_tools = False  # its chat template drops `tools`: Home Assistant control is off
                if modalities.get("vision"):
                    caps.add("see")
                if modalities.get("audio"):
                    caps.add("hear")
            else:
                models = await self._models()
                listed = [m for m in models if isinstance(m.get("capabilities"), list)]
                self.kind = "vllm" if any(m.get("owned_by") == "vllm" for m in models) else "openai"
                if listed:
                    caps = {str(c) for c in listed[0]["capabilities"]}
                elif any("omni" in m["id"].lower() for m in models):
                    caps = {"chat", "hear", "see", "video"}
                else:
                    caps = {"chat"}
        if self.model is None:
            await self._models()
        self.capabilities = caps & set(ALL_CAPABILITIES)
        return self.capabilities

    async def sarai_status(self) -> dict[str, Any]:
        """GET /v1/sarai/status of a SARAi server (engine state, memory, backends, capabilities)."""
        data = await self._request_json("GET", f"{self.base_url}/sarai/status")
        if not isinstance(data, dict):
            raise RemoteProtocolError(f"{self.label} status is not an object")
        return data

    async def prefill(self, request: ChatRequest) -> int:
        """POST /v1/sarai/prefill of a SARAi server: evaluate the request's static prefix there; tokens cached."""
        payload = {**self._payload(request, None, None), "stream": False}
        data = await self._request_json("POST", f"{self.base_url}/sarai/prefill", payload, wait_s=self._total)
        if not isinstance(data, dict) or not isinstance(data.get("tokens"), int):
            raise RemoteProtocolError(f"{self.label} prefill answer has no token count")
        return int(data["tokens"])

    # -- chat ------------------------------------------------------------------------------------

    def _payload(
        self, request: ChatRequest, media: Sequence[Media] | None, extra: dict[str, Any] | None
    ) -> dict[str, Any]:
        messages = [chat_message(m) for m in request.messages]
        if media:
            last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"), None)
            if last is None:
                messages.append({"role": "user", "content": ""})
                last = len(messages) - 1
            text = messages[last]["content"]
            parts = [media_part(kind, data) for kind, data in media]
            messages[last]["content"] = [*parts, *([{"type": "text", "text": text}] if text else [])]
        payload: dict[str, Any] = {
            "model": self.model or "default",
            "messages": messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": True,
        }
        if request.tools:
            payload["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
                }
                for t in request.tools
            ]
            payload["tool_choice"] = "auto"
        if request.json_schema is not None:
            if self._legacy_json_mode:
                payload["response_format"] = {"type": "json_object", "schema": request.json_schema}
            else:
                payload["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "answer", "schema": request.json_schema},
                }
        payload.update(extra or {})
        return payload

    async def _open_chat(self, payload: dict[str, Any]) -> tuple[aiohttp.ClientResponse, float]:
        """POST the chat; a server that refuses ``json_schema`` (llama-cpp-python's) gets the older form, once."""
        resp, started = await self._post("/chat/completions", payload)
        if resp.status < 400 or payload.get("response_format", {}).get("type") != "json_schema":
            return resp, started
        raw = (await resp.read())[:4096].decode("utf-8", errors="replace")
        resp.release()
        if resp.status in (400, 422, 500) and "response_format" in raw and "json_schema" in raw:
            self._legacy_json_mode = True
            schema = payload["response_format"]["json_schema"]["schema"]
            payload = {**payload, "response_format": {"type": "json_object", "schema": schema}}
            return await self._post("/chat/completions", payload)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        raise self._map_error(resp.status, body, raw)

    async def chat_stream(
        self,
        request: ChatRequest,
        media: Sequence[Media] | None = None,
        *,
        use_audio_in_video: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> AsyncIterator[ChatDelta]:
        """POST /v1/chat/completions with stream=true; yields text, then the complete tool calls.

        ``media`` ((kind, bytes) pairs) become content parts of the last user message; ``use_audio_in_video``
        asks vLLM / SARAi to hear a video part's audio track. Generation is not idempotent: nothing is retried
        once the server accepted the request.
        """
        if self.model is None:
            await self._models()
        payload = self._payload(request, media, extra)
        if use_audio_in_video:
            payload["mm_processor_kwargs"] = {"use_audio_in_video": True}
        partial: dict[int, dict[str, Any]] = {}
        finished = False
        try:
            resp, started = await self._open_chat(payload)
            try:
                await self._raise_for(resp)
                ctype = resp.headers.get("Content-Type", "")
                if "text/event-stream" not in ctype:
                    body = (await resp.text())[:200]
                    raise RemoteProtocolError(
                        f"expected an event stream from the {self.label}, got {ctype or 'no content type'}: {body}"
                    )
                parser = SSEParser()
                async for raw in self._stream_body(resp, started):
                    for data in parser.feed(raw):
                        finished, delta = self._event(data, partial)
                        if delta is not None:
                            yield delta
                        if finished:
                            break
                    if finished:
                        break
                else:
                    for data in parser.finish():
                        finished, delta = self._event(data, partial)
                        if delta is not None:
                            yield delta
                        if finished:
                            break
            finally:
                resp.release()
        except (aiohttp.ClientError, TimeoutError) as err:
            raise self._transport(err, "stream failed") from err
        if not finished:
            raise RemoteProtocolError(f"{self.label} stream ended before the answer was complete")
        calls = [self._tool_call(p) for _, p in sorted(partial.items())]
        if calls:
            yield ChatDelta(tool_calls=calls)

    def _event(self, data: str, partial: dict[int, dict[str, Any]]) -> tuple[bool, ChatDelta | None]:
        """(finished, delta) for one event's data."""
        if data.strip() == "[DONE]":
            return True, None
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "error" in obj:
            raise self._map_error(0, obj, data)
        delta = self._parse_chunk(data, partial)
        return self._finish_reason(data), delta

    @staticmethod
    def _finish_reason(data: str) -> bool:
        try:
            return bool(json.loads(data)["choices"][0].get("finish_reason"))
        except ValueError, KeyError, IndexError, TypeError, AttributeError:
            return False

    @staticmethod
    def _parse_chunk(data: str, partial: dict[int, dict[str, Any]]) -> ChatDelta | None:
        try:
            obj = json.loads(data)
        except ValueError as err:
            raise RemoteProtocolError(f"invalid JSON in the stream: {data[:80]}") from err
        if not isinstance(obj, dict):
            raise RemoteProtocolError("invalid chunk in the stream")
        try:
            delta = obj["choices"][0].get("delta") or {}
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise RemoteProtocolError("chunk without choices in the stream") from err
        if not isinstance(delta, dict):
            raise RemoteProtocolError("chunk with an invalid delta in the stream")
        for call in delta.get("tool_calls") or []:
            if not isinstance(call, dict):
                raise RemoteProtocolError("invalid tool call in the stream")
            try:
                index = int(call.get("index", 0))
            except (TypeError, ValueError) as err:
                raise RemoteProtocolError("tool call with an invalid index in the stream") from err
            slot = partial.setdefault(index, {"id": None, "name": "", "arguments": ""})
            slot["id"] = call.get("id") or slot["id"]
            fn = call.get("function") or {}
            slot["name"] += str(fn.get("name") or "")
            args = fn.get("arguments") or ""
            slot["arguments"] += args if isinstance(args, str) else json.dumps(args)
        content = delta.get("content")
        return ChatDelta(content=str(content)) if content else None

    @staticmethod
    def _tool_call(p: dict[str, Any]) -> ToolCall:
        try:
            args = json.loads(p["arguments"] or "{}")
        except ValueError as err:
            raise RemoteProtocolError(f"tool call {p['name']} has invalid JSON arguments") from err
        return ToolCall(
            id=p["id"] or f"call_{uuid.uuid4().hex[:12]}",
            name=p["name"],
            arguments=args if isinstance(args, dict) else {},
        )

    async def _answer(
        self, request: ChatRequest, media: Sequence[Media], *, extra: dict[str, Any] | None = None, **kw: Any
    ) -> str:
        text = ""
        async for delta in self.chat_stream(request, media, extra=extra, **kw):
            text += delta.content
        return text.strip()

    async def transcribe(self, wav: bytes, language: str, max_tokens: int = 128) -> str:
        """Speech (a WAV file) -> text, through an ``input_audio`` part."""
        request = ChatRequest(
            [ChatMessage("user", transcribe_instruction(language))], max_tokens=max_tokens, temperature=0.0
        )
        extra = {"language": language} if self.kind == "sarai" else None
        return await self._answer(request, [("audio", wav)], extra=extra)

    async def describe_image(self, image: bytes, prompt: str, max_tokens: int = 128) -> str:
        """Image bytes (JPEG, PNG, ...) + question -> text, through an ``image_url`` data: URL."""
        request = ChatRequest([ChatMessage("user", prompt)], max_tokens=max_tokens, temperature=0.0)
        return await self._answer(request, [("image", image)])

    async def describe_video(self, video: bytes, prompt: str, *, with_audio: bool = True, max_tokens: int = 256) -> str:
        """A whole clip (MP4/WebM bytes) + question -> text, through a ``video_url`` part (vLLM's form)."""
        request = ChatRequest([ChatMessage("user", prompt)], max_tokens=max_tokens, temperature=0.0)
        return await self._answer(request, [("video", video)], use_audio_in_video=with_audio)

    # -- speech and clips (SARAi extension) ------------------------------------------------------------

    async def speech(self, text: str, voice: str = "Chelsie") -> AsyncIterator[bytes]:
        """POST /v1/audio/speech (``response_format: pcm``): 24 kHz mono 16-bit PCM, in chunks as they come."""
        payload = {"model": self.model or "default", "input": text, "voice": voice, "response_format": "pcm"}
        try:
            resp, started = await self._post("/audio/speech", payload)
            try:
                await self._raise_for(resp)
                odd = b""
                async for chunk in self._stream_body(resp, started):
                    chunk = odd + chunk
                    cut = len(chunk) - len(chunk) % 2  # whole 16-bit samples only
                    odd = chunk[cut:]
                    if cut:
                        yield chunk[:cut]
            finally:
                resp.release()
        except (aiohttp.ClientError, TimeoutError) as err:
            raise self._transport(err, "speech failed") from err

    async def describe_clip(
        self,
        frames: np.ndarray,
        fps: float,
        audio16: np.ndarray | None,
        prompt: str,
        *,
        frame_times: Sequence[float] | None = None,
        max_tokens: int = 256,
    ) -> str:
        """Frames (T, H, W, 3 uint8) + 16 kHz mono audio, time-aligned -> text (SARAi's ``/v1/sarai/clip``)."""
        from .audio import HEAR_RATE, float_to_pcm16, wav_bytes

        payload: dict[str, Any] = {
            "frames": [base64.b64encode(encode_jpeg(f)).decode("ascii") for f in frames],
            "fps": float(fps),
            "prompt": prompt,
            "max_tokens": max_tokens,
        }
        if frame_times is not None:
            payload["frame_times"] = [float(t) for t in frame_times]
        if audio16 is not None and audio16.size:
            payload["audio"] = base64.b64encode(wav_bytes(float_to_pcm16(audio16), HEAR_RATE)).decode("ascii")
        data = await self._request_json("POST", f"{self.base_url}/sarai/clip", payload, wait_s=self._total)
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise RemoteProtocolError(f"{self.label} clip answer has no text")
        return str(data["text"])
