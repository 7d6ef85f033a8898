"""Debian's llama-server (llama.cpp-tools) on the tiny GGUF + tiny mmproj, spoken to with plain aiohttp.

These tests pin down the OpenAI-compatible protocol that SARAi's client and capability probe rely on:
/v1/models, /props (modalities, chat template capabilities), streamed chat completions with tools,
`input_audio` (hearing), `image_url` data URLs (a camera snapshot), `response_format` json_schema,
and the API key. The tiny model is random: only shapes are asserted, never words.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp
from homeassistant.components.camera import async_get_image
from homeassistant.core import HomeAssistant
import pytest

from devtools.media import make_speech_wav
from tests import llama_server as _servers
from tests.common import tone_wav
from tests.llama_server import LlamaServer

# The fixtures (tests/llama_server.py), made visible to this module's tests.
llama_server = _servers.llama_server
llama_server_qwen_tools = _servers.llama_server_qwen_tools

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "HassTurnOn",
            "description": "Turns on a device",
            "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
        },
    }
]
IM_END = 268  # token id of <|im_end|> in the tiny vocabulary (256 bytes + 10 merges + <|endoftext|>, <|im_start|>)
TOOL_CALL_TEXT = '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "kitchen"}}\n</tool_call>'
# llama-server closes the connection after a streamed answer although it says Keep-Alive: a POST sent
# at once on the pooled connection then fails with ServerDisconnectedError (aiohttp retries only
# idempotent requests such as GET). `Connection: close` on streamed requests avoids it
# (test_connection_close_after_stream).
CLOSE = {"Connection": "close"}


def _messages(text: str = "Enciende la luz de la cocina") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def _post(server: LlamaServer, body: dict[str, Any], *, key: str | None = None) -> tuple[int, str, Any]:
    """POST /v1/chat/completions; a stream comes back as its list of events (``[DONE]`` as ``{"done": True}``)."""
    headers = {"Authorization": f"Bearer {server.api_key if key is None else key}", **CLOSE}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.url}/chat/completions", json=body, headers=headers) as resp,
    ):
        ctype = resp.headers.get("Content-Type", "")
        text = await resp.text()
    if not body.get("stream") or resp.status != 200:
        return resp.status, ctype, json.loads(text)
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        assert line.startswith("data: "), line
        data = line.removeprefix("data: ")
        events.append({"done": True} if data == "[DONE]" else json.loads(data))
    return resp.status, ctype, events


async def _get(server: LlamaServer, path: str, *, key: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with aiohttp.ClientSession() as session, session.get(f"{server.root}{path}", headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


def _assert_completion(body: dict[str, Any], finish: tuple[str, ...] = ("stop", "length")) -> dict[str, Any]:
    """The non-streamed chat.completion shape; returns its message."""
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["system_fingerprint"].startswith("b")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in finish
    assert set(body["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    message: dict[str, Any] = choice["message"]
    assert message["role"] == "assistant"
    return message


def _assert_stream(events: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]], str, dict[str, Any] | None]:
    """The chat.completion.chunk stream shape; returns (content, tool call deltas, finish reason, usage)."""
    assert events[-1] == {"done": True}
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    # First chunk: usually the role with content null; with tools and a sampled answer llama-server may start
    # with the content itself (seen once in ~10 runs): either way, index 0 and no finish reason yet.
    (first,) = chunks[0]["choices"]
    assert first["index"] == 0 and first["finish_reason"] is None
    assert first["delta"].get("role", "assistant") == "assistant"
    content, finish, usage = "", "", None
    calls: list[dict[str, Any]] = []
    for chunk in chunks:
        if chunk.get("usage"):  # stream_options.include_usage: a last chunk with no choices
            assert chunk["choices"] == []
            usage = chunk["usage"]
            continue
        (choice,) = chunk["choices"]
        delta = choice["delta"]
        content += delta.get("content") or ""
        calls += delta.get("tool_calls") or []
        if choice["finish_reason"] is not None:
            assert not finish, "two finish reasons"
            finish = choice["finish_reason"]
            assert delta == {}
    assert finish in ("stop", "length", "tool_calls")
    return content, calls, finish, usage


async def test_health_and_models(llama_server: LlamaServer, socket_enabled: None) -> None:
    """/health needs no key; /v1/models lists the GGUF with its input modalities (OpenAI + Ollama shapes)."""
    assert await _get(llama_server, "/health") == (200, {"status": "ok"})
    assert await _get(llama_server, "/v1/health") == (200, {"status": "ok"})
    status, models = await _get(llama_server, "/v1/models", key=llama_server.api_key)
    assert status == 200
    assert models["object"] == "list"
    (model,) = models["data"]
    assert model["object"] == "model" and model["owned_by"] == "llamacpp"
    assert model["id"].endswith("tiny.gguf")
    assert model["architecture"] == {
        "input_modalities": ["text", "image", "audio", "video"],
        "output_modalities": ["text"],
    }
    assert model["meta"]["n_ctx"] == 4096 and model["meta"]["n_vocab"] == 277
    (ollama,) = models["models"]
    assert ollama["capabilities"] == ["completion", "multimodal"]


async def test_props_modalities_and_template_caps(llama_server: LlamaServer, socket_enabled: None) -> None:
    """/props (not under /v1, key required): the mmproj's modalities and what the chat template supports."""
    assert (await _get(llama_server, "/v1/props", key=llama_server.api_key))[0] == 404
    assert (await _get(llama_server, "/props"))[0] == 401
    status, props = await _get(llama_server, "/props", key=llama_server.api_key)
    assert status == 200
    assert props["modalities"] == {"vision": True, "video": True, "audio": True}
    assert props["total_slots"] == 1
    assert props["default_generation_settings"]["n_ctx"] == 4096
    assert props["build_info"].startswith("b")
    assert props["model_path"].endswith("tiny.gguf")
    # The tiny GGUF's own ChatML template has no tools: llama-server will ignore `tools`.
    caps = props["chat_template_caps"]
    assert caps["supports_tools"] is False and caps["supports_tool_calls"] is False
    assert caps["supports_system_role"] is True
    assert props["default_generation_settings"]["params"]["chat_format"] == "Content-only"
    assert props["eos_token"] == "<|im_end|>"


@pytest.mark.parametrize("key", ["wrong-key", ""])
async def test_wrong_or_missing_api_key(llama_server: LlamaServer, socket_enabled: None, key: str) -> None:
    """A wrong (or no) key is a 401 with an OpenAI-style error body, on every /v1 endpoint."""
    unauthorized = {"error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}}
    assert await _get(llama_server, "/v1/models", key=key or None) == (401, unauthorized)
    status, _, body = await _post(llama_server, {"messages": _messages(), "max_tokens": 2}, key=key)
    assert (status, body) == (401, unauthorized)


async def test_streamed_chat_with_tools(llama_server: LlamaServer, socket_enabled: None) -> None:
    """A streamed turn with a tools list: the chunk protocol; with this template the tools are not even rendered."""
    base = {"messages": _messages(), "stream": True, "max_tokens": 16, "temperature": 0}
    base["stream_options"] = {"include_usage": True}
    status, ctype, events = await _post(llama_server, {**base, "tools": TOOLS})
    assert status == 200 and ctype.startswith("text/event-stream")
    content, calls, finish, usage = _assert_stream(events)
    assert usage is not None and usage["completion_tokens"] == 16
    # Random model: it rarely calls a tool; whatever it does, the deltas are OpenAI-shaped.
    for call in calls:
        assert set(call) >= {"index", "function"}
    if not calls:
        assert content and finish == "length"
    # Same prompt size with and without tools: a template without tool support drops them.
    _, _, events = await _post(llama_server, base)
    plain_usage = _assert_stream(events)[3]
    assert plain_usage is not None and plain_usage["prompt_tokens"] == usage["prompt_tokens"]


async def test_qwen_template_parses_tool_call(llama_server_qwen_tools: LlamaServer, socket_enabled: None) -> None:
    """With Qwen2.5's tool template, `<tool_call>{json}</tool_call>` in the answer becomes OpenAI `tool_calls`.

    The random model is made to "answer" the tool call by prefilling it as the assistant turn and biasing
    <|im_end|>, so the parse is deterministic.
    """
    server = llama_server_qwen_tools
    status, props = await _get(server, "/props", key=server.api_key)
    assert status == 200
    assert props["chat_template_caps"]["supports_tools"] is True
    assert props["chat_template_caps"]["supports_parallel_tool_calls"] is True
    assert props["modalities"] == {"vision": False, "video": False, "audio": False}
    prefill = {
        "messages": [*_messages(), {"role": "assistant", "content": TOOL_CALL_TEXT}],
        "tools": TOOLS,
        "logit_bias": {str(IM_END): 100},
        "max_tokens": 4,
        "temperature": 0,
    }
    status, _, body = await _post(server, prefill)
    assert status == 200
    message = _assert_completion(body, finish=("tool_calls",))
    assert message["content"] == ""
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and isinstance(call["id"], str) and call["id"]
    assert call["function"]["name"] == "HassTurnOn"
    assert json.loads(call["function"]["arguments"]) == {"name": "kitchen"}  # a JSON string, as OpenAI
    # Streamed: a tool_calls delta with index, id, type and the name; finish_reason "tool_calls".
    status, _, events = await _post(server, {**prefill, "stream": True})
    assert status == 200
    content, calls, finish, _ = _assert_stream(events)
    assert (content, finish) == ("", "tool_calls")
    assert calls and calls[0]["index"] == 0 and calls[0]["type"] == "function" and calls[0]["id"]
    assert calls[0]["function"]["name"] == "HassTurnOn"
    # The tools are rendered into the system prompt (>500 tokens for one tool); a random answer is plain text.
    status, _, events = await _post(
        server, {"messages": _messages(), "tools": TOOLS, "stream": True, "max_tokens": 8, "temperature": 0}
    )
    assert status == 200
    _assert_stream(events)


async def test_input_audio_wav(llama_server: LlamaServer, socket_enabled: None) -> None:
    """STT-like: an `input_audio` part with a base64 WAV is heard.

    The audio encoder works in 30 s windows: any clip up to 30 s costs 750 prompt tokens (+2 markers),
    0.2 s as much as 29.9 s; each further started window costs 750 more.
    """
    body: dict[str, Any] = {"max_tokens": 8, "temperature": 0}

    def with_audio(wav: bytes) -> list[dict[str, Any]]:
        part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
        return [{"role": "user", "content": [{"type": "text", "text": "Transcribe el audio."}, part]}]

    status, _, answer = await _post(llama_server, {**body, "messages": with_audio(make_speech_wav())})
    assert status == 200, answer
    message = _assert_completion(answer)
    assert isinstance(message["content"], str) and message["content"]
    _, _, text_only = await _post(llama_server, {**body, "messages": _messages("Transcribe el audio.")})
    text_tokens = text_only["usage"]["prompt_tokens"]
    assert answer["usage"]["prompt_tokens"] - text_tokens == 752
    for seconds, tokens in ((0.2, 752), (29.9, 752), (31.0, 1502)):
        _, _, answer = await _post(llama_server, {**body, "max_tokens": 1, "messages": with_audio(tone_wav(seconds))})
        assert answer["usage"]["prompt_tokens"] - text_tokens == tokens, seconds
    # Undecodable audio: a 400 with an OpenAI-style error.
    bad = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF0000").decode(), "format": "wav"}}
    status, _, error = await _post(llama_server, {**body, "messages": [{"role": "user", "content": [bad]}]})
    assert status == 400
    assert error == {
        "error": {"code": 400, "message": "Failed to load image or audio file", "type": "invalid_request_error"}
    }


async def test_image_url_from_camera(
    hass: HomeAssistant, front_door: Any, llama_server: LlamaServer, socket_enabled: None
) -> None:
    """Camera-like: a snapshot of camera.front_door as a base64 JPEG `data:` URL in an `image_url` part."""
    image = await async_get_image(hass, "camera.front_door")
    assert image.content_type == "image/jpeg"
    url = f"data:image/jpeg;base64,{base64.b64encode(image.content).decode()}"
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "¿Hay alguien en la puerta?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
        "max_tokens": 8,
        "temperature": 0,
    }
    status, _, answer = await _post(llama_server, body)
    assert status == 200, answer
    assert _assert_completion(answer)["content"]
    _, _, text_only = await _post(llama_server, {**body, "messages": _messages("¿Hay alguien en la puerta?")})
    assert answer["usage"]["prompt_tokens"] > text_only["usage"]["prompt_tokens"]
    # A broken JPEG is the same 400 as broken audio.
    bad = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}}
    status, _, error = await _post(llama_server, {**body, "messages": [{"role": "user", "content": [bad]}]})
    assert status == 400 and error["error"]["type"] == "invalid_request_error"


async def test_media_without_mmproj(llama_server_qwen_tools: LlamaServer, socket_enabled: None) -> None:
    """No mmproj: audio and image parts are a 500 naming the missing mmproj (the probe reads /props instead)."""
    for part, kind in (
        ({"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}}, "image"),
        ({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}, "audio"),
    ):
        body = {"messages": [{"role": "user", "content": [part]}], "max_tokens": 2}
        status, _, error = await _post(llama_server_qwen_tools, body)
        assert status == 500
        assert error["error"]["type"] == "server_error"
        assert error["error"]["message"].startswith(f"{kind} input is not supported")
        assert "mmproj" in error["error"]["message"]


async def test_response_format_json_schema(llama_server: LlamaServer, socket_enabled: None) -> None:
    """`response_format: json_schema` is honoured: even the random model's answer is valid, conforming JSON."""
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "enum": ["yes", "no"]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
            "sure": {"type": "boolean"},
        },
        "required": ["answer", "count", "sure"],
        "additionalProperties": False,
    }
    body = {
        "messages": _messages("¿Hay alguien en la puerta?"),
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        "max_tokens": 96,
        "temperature": 0,
    }
    status, _, answer = await _post(llama_server, body)
    assert status == 200, answer
    message = _assert_completion(answer, finish=("stop",))
    data = json.loads(message["content"])
    assert set(data) == {"answer", "count", "sure"}
    assert data["answer"] in ("yes", "no") and isinstance(data["sure"], bool)
    assert isinstance(data["count"], int) and 0 <= data["count"] <= 9
    # json_object: any JSON object.
    status, _, answer = await _post(llama_server, {**body, "response_format": {"type": "json_object"}})
    assert status == 200
    assert isinstance(json.loads(_assert_completion(answer, finish=("stop",))["content"]), dict)
    # Without it the random model's answer is not JSON: the constraint did the work.
    _, _, free = await _post(llama_server, {k: v for k, v in body.items() if k != "response_format"})
    with pytest.raises(ValueError):
        json.loads(_assert_completion(free)["content"])


async def test_connection_close_after_stream(llama_server: LlamaServer, socket_enabled: None) -> None:
    """With `Connection: close` on streamed requests, a pooled session alternates streamed and plain requests."""
    headers = {"Authorization": f"Bearer {llama_server.api_key}"}
    async with aiohttp.ClientSession() as session:
        for i in range(6):
            stream = i % 2 == 0
            body = {"messages": _messages("hola"), "max_tokens": 2, "stream": stream}
            async with session.post(
                f"{llama_server.url}/chat/completions", json=body, headers={**headers, **(CLOSE if stream else {})}
            ) as resp:
                assert resp.status == 200
                text = await resp.text()
            assert text.rstrip().endswith("data: [DONE]") if stream else json.loads(text)["object"] == "chat.completion"
        # An Authorization header without "Bearer " and an X-Api-Key header are accepted too.
        for alt in ({"Authorization": llama_server.api_key}, {"X-Api-Key": llama_server.api_key}):
            async with session.get(f"{llama_server.url}/models", headers=alt) as resp:
                assert resp.status == 200


# -- SARAi's OpenAI client (custom_components/sarai/engine/openai_client.py) against the real server ------


async def test_openai_client_probe_and_media(llama_server: LlamaServer, socket_enabled: None) -> None:
    """The client's capability probe reads /props; hearing, seeing and JSON mode work through it."""
    from custom_components.sarai.engine.openai_client import OpenAIClient
    from custom_components.sarai.engine.types import ChatMessage, ChatRequest
    from devtools.media import make_jpeg

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        client = OpenAIClient(session, llama_server.url, llama_server.api_key)
        assert await client.probe() == {"chat", "hear", "see"}
        assert client.kind == "llama.cpp"
        assert client.model is not None and client.model.endswith("tiny.gguf")
        assert isinstance(await client.transcribe(make_speech_wav(), "es", max_tokens=4), str)
        assert isinstance(await client.describe_image(make_jpeg((96, 64)), "¿Qué ves?", max_tokens=4), str)
        schema = {
            "type": "object",
            "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
            "required": ["answer"],
            "additionalProperties": False,
        }
        request = ChatRequest([ChatMessage("user", "¿Sí o no?")], max_tokens=32, temperature=0.0, json_schema=schema)
        text = "".join([d.content async for d in client.chat_stream(request)])
        assert json.loads(text)["answer"] in ("yes", "no")


async def test_openai_client_tool_call(llama_server_qwen_tools: LlamaServer, socket_enabled: None) -> None:
    """A `<tool_call>` parsed by llama-server reaches the client as one complete ToolCall."""
    from custom_components.sarai.engine.openai_client import OpenAIClient
    from custom_components.sarai.engine.types import ChatMessage, ChatRequest, ToolSpec

    tool = TOOLS[0]["function"]
    request = ChatRequest(
        [ChatMessage("user", "Enciende la cocina"), ChatMessage("assistant", TOOL_CALL_TEXT)],
        tools=[ToolSpec(tool["name"], tool["description"], tool["parameters"])],
        max_tokens=4,
        temperature=0.0,
    )
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        client = OpenAIClient(session, llama_server_qwen_tools.url, llama_server_qwen_tools.api_key)
        assert await client.probe() == {"chat"}
        deltas = [d async for d in client.chat_stream(request, extra={"logit_bias": {str(IM_END): 100}})]
    calls = [c for d in deltas for c in d.tool_calls]
    assert [c.name for c in calls] == ["HassTurnOn"] and calls[0].id


async def test_openai_client_request_right_after_stream(llama_server: LlamaServer, socket_enabled: None) -> None:
    """Two streamed answers in a row on one pooled session (as Home Assistant's shared session does)."""
    from custom_components.sarai.engine.openai_client import OpenAIClient
    from custom_components.sarai.engine.types import ChatMessage, ChatRequest

    request = ChatRequest([ChatMessage("user", "hola")], max_tokens=2, temperature=0.0)
    async with aiohttp.ClientSession() as session:
        client = OpenAIClient(session, llama_server.url, llama_server.api_key)
        assert await client.list_models()  # a GET right after a stream is retried by aiohttp: fine
        for _ in range(3):
            assert [d async for d in client.chat_stream(request)]
