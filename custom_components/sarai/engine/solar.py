"""Client for the SOLAR fallback: any OpenAI-compatible server (llama.cpp server, vLLM).

The aiohttp session is injected by the caller (Home Assistant's shared session)."""

from __future__ import annotations

from collections.abc import AsyncIterator
import json
from typing import Any
import uuid

import aiohttp

from .errors import RemoteAuthError, RemoteError, RemoteProtocolError
from .types import ChatDelta, ChatMessage, ChatRequest, ToolCall


def _message(msg: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": msg.role, "content": msg.content}
    if msg.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
            for c in msg.tool_calls
        ]
    if msg.role == "tool":
        out["tool_call_id"] = msg.tool_call_id
    return out


class SolarClient:
    """Talks /v1/models and /v1/chat/completions (SSE streaming, tool calls)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str | None = None,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        total_timeout: float = 180.0,
        verify_ssl: bool = True,
    ) -> None:
        """Configure; nothing is sent until a call."""
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else f"{base}/v1"
        self._session = session
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=total_timeout, connect=connect_timeout, sock_read=read_timeout)
        self._ssl: bool = verify_ssl
        self.model: str | None = None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    async def _check(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status in (401, 403):
            raise RemoteAuthError(f"SOLAR server rejected the API key (HTTP {resp.status})", status=resp.status)
        if resp.status >= 400:
            body = (await resp.text())[:200]
            raise RemoteError(f"SOLAR server answered HTTP {resp.status}: {body}", status=resp.status)

    async def list_models(self) -> list[str]:
        """GET /v1/models: health check and model discovery."""
        try:
            async with self._session.get(
                f"{self.base_url}/models", headers=self._headers(), timeout=self._timeout, ssl=self._ssl
            ) as resp:
                await self._check(resp)
                try:
                    data = await resp.json(content_type=None)
                    models = [str(m["id"]) for m in data["data"]]
                except (ValueError, KeyError, TypeError) as err:
                    raise RemoteProtocolError(f"/v1/models is not OpenAI-compatible: {err}") from err
        except (aiohttp.ClientError, TimeoutError) as err:
            raise RemoteError(f"cannot reach the SOLAR server: {err or type(err).__name__}") from err
        if models and self.model is None:
            self.model = models[0]
        return models

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        """POST /v1/chat/completions with stream=true; yields text and complete tool calls.

        Generation is not idempotent: nothing is retried here once the request is sent.
        """
        if self.model is None:
            await self.list_models()
        payload: dict[str, Any] = {
            "model": self.model or "default",
            "messages": [_message(m) for m in request.messages],
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
        if request.json_schema is not None:
            payload["response_format"] = {"type": "json_object", "schema": request.json_schema}
        partial: dict[int, dict[str, Any]] = {}
        finished = False
        try:
            async with self._session.post(
                f"{self.base_url}/chat/completions",
                json=payload,
                headers=self._headers(),
                timeout=self._timeout,
                ssl=self._ssl,
            ) as resp:
                await self._check(resp)
                ctype = resp.headers.get("Content-Type", "")
                if "text/event-stream" not in ctype:
                    body = (await resp.text())[:200]
                    raise RemoteProtocolError(f"expected an event stream, got {ctype or 'no content type'}: {body}")
                buffer = b""
                async for raw in resp.content:
                    buffer += raw
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        text = line.decode("utf-8", errors="replace").strip()
                        if not text.startswith("data:"):
                            continue
                        data = text[5:].strip()
                        if data == "[DONE]":
                            finished = True
                            break
                        delta = self._parse_chunk(data, partial)
                        if delta is not None:
                            yield delta
                        if self._finish_reason(data):
                            finished = True
                    if finished:
                        break
        except (aiohttp.ClientError, TimeoutError) as err:
            raise RemoteError(f"SOLAR stream failed: {err or type(err).__name__}") from err
        if not finished:
            raise RemoteProtocolError("SOLAR stream ended before the answer was complete")
        calls = [self._tool_call(p) for _, p in sorted(partial.items())]
        if calls:
            yield ChatDelta(tool_calls=calls)

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
            raise RemoteProtocolError(f"invalid JSON in the SOLAR stream: {data[:80]}") from err
        if not isinstance(obj, dict):
            raise RemoteProtocolError("invalid chunk in the SOLAR stream")
        if "error" in obj:
            raise RemoteError(f"SOLAR server error: {str(obj['error'])[:200]}")
        try:
            delta = obj["choices"][0].get("delta") or {}
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise RemoteProtocolError("chunk without choices in the SOLAR stream") from err
        for call in delta.get("tool_calls") or []:
            slot = partial.setdefault(int(call.get("index", 0)), {"id": None, "name": "", "arguments": ""})
            slot["id"] = call.get("id") or slot["id"]
            fn = call.get("function") or {}
            slot["name"] += fn.get("name") or ""
            slot["arguments"] += fn.get("arguments") or ""
        content = delta.get("content")
        return ChatDelta(content=content) if content else None

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
