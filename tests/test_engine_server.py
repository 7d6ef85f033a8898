"""The engine server (engine/server.py) and the OpenAI client (engine/openai_client.py), on the tiny real models.

The server runs in the test's event loop on 127.0.0.1 (its logic counts for coverage); one test starts it as a
real child process (``python -m engine.server``) and talks to it with the client end to end.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
import io
import json
import os
from pathlib import Path
import signal
import sys
from typing import Any
import wave

import aiohttp
from aiohttp import web
import numpy as np
import pytest

from custom_components.sarai.engine import ChatMessage, ChatRequest, EngineConfig, SaraiEngine
from custom_components.sarai.engine.errors import (
    ContextOverflow,
    DependencyMissing,
    EngineError,
    InsufficientMemory,
    InvalidInput,
    ModelMissing,
    RemoteAuthError,
    RemoteError,
    RemoteProtocolError,
    RequestTimeout,
    UnsupportedModality,
)
from custom_components.sarai.engine.openai_client import (
    OpenAIClient,
    SSEParser,
    error_body,
    error_status,
    image_mime,
    media_part,
    safe_message,
    sarai_error,
    video_mime,
)
from custom_components.sarai.engine.server import (
    build_parser,
    create_app,
    errors_middleware,
    main,
    respond_chat,
    serve,
)
from custom_components.sarai.engine.solar import SolarClient
from custom_components.sarai.engine.text import split_sentences
from custom_components.sarai.engine.types import ChatDelta, ToolCall, ToolSpec
from devtools.media import make_jpeg, make_speech_wav
from tests.common import local_server, tone_wav

REPO = Path(__file__).resolve().parent.parent
ENGINE_PARENT = str(REPO / "custom_components" / "sarai")
LIGHT = ToolSpec(
    "HassTurnOn",
    "Turns on a device",
    {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
async def engine(gguf_path: str, mmproj_path: str, omni_path: str) -> AsyncIterator[SaraiEngine]:
    """Every capability: GGUF + mmproj (hear, see) + Omni (speak, video)."""
    eng = SaraiEngine(
        EngineConfig(
            gguf_model=gguf_path, mmproj_model=mmproj_path, omni_model=omni_path, n_ctx=4096, omni_dtype="float32"
        )
    )
    yield eng
    await eng.close()


@pytest.fixture
async def text_engine(gguf_path: str) -> AsyncIterator[SaraiEngine]:
    """Text only (no hearing, seeing or speaking), small context."""
    eng = SaraiEngine(EngineConfig(gguf_model=gguf_path, n_ctx=512))
    yield eng
    await eng.close()


@pytest.fixture
async def session(socket_enabled: None) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session of the test's own."""
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def url(engine: SaraiEngine, socket_enabled: None) -> AsyncIterator[str]:
    """The full engine served in-process."""
    async with local_server(create_app(engine, model_id="tiny")) as base:
        yield base


async def _post(session: aiohttp.ClientSession, url: str, path: str, body: Any, **kw: Any) -> tuple[int, Any]:
    async with session.post(f"{url}{path}", json=body, **kw) as resp:
        return resp.status, await resp.json(content_type=None)


# -- the full engine over HTTP ---------------------------------------------------------------------------


async def test_models_status_health_and_chat(url: str, session: aiohttp.ClientSession) -> None:
    """Discovery endpoints; a text chat whole and streamed in OpenAI's shapes."""
    async with session.get(f"{url}/v1/models") as resp:
        models = await resp.json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["owned_by"] == "sarai"
    assert {"chat", "hear", "see", "speak", "video"} <= set(models["data"][0]["capabilities"])
    async with session.get(f"{url}/v1/sarai/status") as resp:
        status = await resp.json()
    assert status["model"] == "tiny" and "remote" not in status["capabilities"] and status["backends"]
    async with session.get(f"{url}/health") as resp:
        assert (await resp.json()) == {"status": "ok"}

    code, body = await _post(session, url, "/v1/chat/completions", {"messages": _user("hola"), "max_tokens": 6})
    assert code == 200, body
    # A system-only conversation, a plain-text response_format, a tool without parameters switched off.
    plain = {
        "messages": [{"role": "system", "content": "Eres SARAi."}],
        "max_tokens": 4,
        "response_format": {"type": "text"},
        "tools": [{"type": "function", "function": {"name": "ping"}}],
        "tool_choice": "none",
    }
    code, body = await _post(session, url, "/v1/chat/completions", plain)
    assert code == 200, body
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "stop"

    payload = {"messages": [{"role": "developer", "content": "Sé breve."}, *_user("hola")], "max_tokens": 6}
    async with session.post(f"{url}/v1/chat/completions", json={**payload, "stream": True}) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        parser = SSEParser()
        events = [e for chunk in [await resp.read()] for e in parser.feed(chunk)] + parser.finish()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"][0]["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_client_probe_chat_tools_and_json(url: str, session: aiohttp.ClientSession) -> None:
    """OpenAIClient against the server: capabilities, streaming, a tool round trip (shape only), a JSON schema."""
    client = OpenAIClient(session, url, read_timeout=60)
    caps = await client.probe()
    assert caps == {"chat", "hear", "see", "speak", "video"}
    assert client.kind == "sarai" and client.model == "tiny"
    assert (await client.sarai_status())["state"] in ("idle", "ready", "busy")

    text = ""
    async for delta in client.chat_stream(ChatRequest([ChatMessage("user", "hola")], max_tokens=6)):
        text += delta.content
    assert isinstance(text, str)

    request = ChatRequest([ChatMessage("user", "enciende la cocina")], tools=[LIGHT], max_tokens=24, temperature=0.0)
    deltas = [d async for d in client.chat_stream(request)]
    calls = [c for d in deltas for c in d.tool_calls]
    assert all(isinstance(d, ChatDelta) for d in deltas)
    assert all(isinstance(c, ToolCall) and isinstance(c.name, str) and isinstance(c.arguments, dict) for c in calls)
    # The second half of a round trip: the call and its result go back, the model answers.
    call = ToolCall("call_1", "HassTurnOn", {"name": "cocina"})
    follow = ChatRequest(
        [
            ChatMessage("user", "enciende la cocina"),
            ChatMessage("assistant", "", tool_calls=[call]),
            ChatMessage("tool", json.dumps({"success": True}), tool_call_id="call_1", name="HassTurnOn"),
        ],
        tools=[LIGHT],
        max_tokens=8,
    )
    assert all(isinstance(d, ChatDelta) for d in [d async for d in client.chat_stream(follow)])

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    structured = ChatRequest([ChatMessage("user", "x")], max_tokens=40, temperature=0.0, json_schema=schema)
    answer = "".join([d.content async for d in client.chat_stream(structured)])
    assert answer.lstrip().startswith("{")
    # The older form is accepted too (non-streaming).
    code, body = await _post(
        session,
        url,
        "/v1/chat/completions",
        {
            "messages": _user("x"),
            "max_tokens": 40,
            "temperature": 0,
            "response_format": {"type": "json_object", "schema": schema},
        },
    )
    assert code == 200 and body["choices"][0]["message"]["content"].lstrip().startswith("{")


async def test_image_audio_and_video_parts(url: str, session: aiohttp.ClientSession, clip_path: Path) -> None:
    """An image is described, audio transcribed or answered about, a video_url clip watched and heard."""
    client = OpenAIClient(session, url, read_timeout=120)
    await client.probe()
    assert isinstance(await client.describe_image(make_jpeg((96, 64)), "¿Qué ves?", max_tokens=6), str)
    assert isinstance(await client.transcribe(make_speech_wav(), "es"), str)
    # Audio only (no text) is a transcript too; audio + a question goes through the hearing model.
    for content in (
        [{"type": "input_audio", "input_audio": {"data": _b64(tone_wav(0.5)), "format": "wav"}}],
        [
            {"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{_b64(tone_wav(0.5))}"}},
            {"type": "text", "text": "¿Qué suena?"},
        ],
    ):
        code, body = await _post(
            session, url, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "max_tokens": 6}
        )
        assert code == 200, body
        assert isinstance(body["choices"][0]["message"]["content"], str)
    # vLLM's video form: a data: URL, audio track heard (nothing written to disk), streamed as one chunk.
    video = clip_path.read_bytes()
    text = await client.describe_video(video, "¿Qué pasa?", with_audio=True, max_tokens=8)
    assert isinstance(text, str)
    # An image part in an earlier message is dropped; the last message is text: a plain chat.
    history = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": media_part("image", make_jpeg())["image_url"]["url"]}},
                {"type": "text", "text": "¿Qué es?"},
            ],
        },
        {"role": "assistant", "content": "Un cuadrado rojo."},
        {"role": "user", "content": "¿Y el color?"},
    ]
    code, body = await _post(session, url, "/v1/chat/completions", {"messages": history, "max_tokens": 4})
    assert code == 200, body
    # Bytes that are not an image / not a video: 400 with the media's own key.
    for part, key in [
        ({"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,bm90IGFuIGltYWdl"}}, "image_invalid"),
        ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,aGVsbG8="}}, "video_invalid"),
        (
            {"type": "video_url", "video_url": {"url": f"data:video/wav;base64,{_b64(tone_wav(0.2))}"}},
            "video_no_stream",
        ),
    ]:
        code, body = await _post(
            session, url, "/v1/chat/completions", {"messages": [{"role": "user", "content": [part]}]}
        )
        assert code == 400 and body["error"]["code"] == key, body


async def test_audio_question_with_omni_only(gguf_path: str, omni_path: str, session: aiohttp.ClientSession) -> None:
    """Without the mmproj an audio question is answered by the text model over Omni's transcript."""
    eng = SaraiEngine(EngineConfig(gguf_model=gguf_path, omni_model=omni_path, n_ctx=2048, omni_dtype="float32"))
    try:
        async with local_server(create_app(eng)) as base:
            content = [
                {"type": "input_audio", "input_audio": {"data": _b64(make_speech_wav()), "format": "wav"}},
                {"type": "text", "text": "¿Qué pide?"},
            ]
            code, body = await _post(
                session,
                base,
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": content}], "max_tokens": 6},
            )
            assert code == 200, body
            assert isinstance(body["choices"][0]["message"]["content"], str)
    finally:
        await eng.close()


async def test_speech_wav_and_pcm(url: str, session: aiohttp.ClientSession, caplog) -> None:
    """Speech comes as a 24 kHz mono 16-bit WAV (open-ended header) or raw PCM, sentence by sentence."""
    async with session.post(
        f"{url}/v1/audio/speech", json={"model": "tiny", "input": "Hola. Adiós.", "voice": "ethan"}
    ) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "audio/wav"
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        data = await resp.read()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
    client = OpenAIClient(session, url, read_timeout=120)
    chunks = [c async for c in client.speech("Hola.", "Chelsie")]
    assert all(len(c) % 2 == 0 for c in chunks)
    # A listener that hangs up mid-speech: the rest is not sent, the server stays usable.
    resp = await session.post(f"{url}/v1/audio/speech", json={"input": "Uno. Dos. Tres.", "response_format": "pcm"})
    assert resp.headers["Content-Type"] == "audio/pcm" and resp.headers["X-Sample-Rate"] == "24000"
    await resp.content.readany()
    resp.close()
    for _ in range(400):
        if "went away mid-speech" in caplog.text:
            break
        await asyncio.sleep(0.05)
    assert "went away mid-speech" in caplog.text


async def test_clip_extension(url: str, session: aiohttp.ClientSession, clip_path: Path) -> None:
    """/v1/sarai/clip: frames + audio decoded by prepare_clip, sent as JPEG + WAV, described time-aligned."""
    from custom_components.sarai.engine.media import prepare_clip

    clip = await asyncio.to_thread(prepare_clip, str(clip_path), 4.0, 2.0, True, 112 * 112)
    assert clip.audio is not None
    client = OpenAIClient(session, url, read_timeout=120)
    text = await client.describe_clip(
        clip.frames, clip.fps, clip.audio, "¿Qué pasa?", frame_times=clip.frame_times, max_tokens=8
    )
    assert isinstance(text, str)
    frames = [_b64(make_jpeg((64, 48)))] * 2
    code, body = await _post(session, url, "/v1/sarai/clip", {"frames": frames, "fps": 1})
    assert code == 200 and body["object"] == "sarai.clip" and body["frame_times"] == [0.0, 1.0]
    assert body["audio_s"] == 0.0
    bad_bodies = [
        ({"frames": []}, "invalid_input"),
        ({"frames": [_b64(make_jpeg((64, 48))), _b64(make_jpeg((96, 64)))]}, "video_invalid"),
        ({"frames": frames * 200}, "invalid_input"),
        ({"frames": frames, "frame_times": [1.0, 0.5]}, "invalid_input"),
        ({"frames": frames, "fps": 0}, "invalid_input"),
        ({"frames": frames, "fps": 0.05}, "video_duration"),
        ({"frames": ["%%%"]}, "invalid_input"),
        ({"frames": [_b64(b"not a jpeg")]}, "image_invalid"),
        ({"frames": frames, "audio": _b64(b"not a wav")}, "audio_invalid"),
    ]
    for bad_body, key in bad_bodies:
        code, body = await _post(session, url, "/v1/sarai/clip", bad_body)
        assert code == 400, (bad_body, body)
        assert body["error"]["code"] == key, (bad_body, body)


# -- auth, bad input, errors ---------------------------------------------------------------------------------


async def test_api_key(text_engine: SaraiEngine, session: aiohttp.ClientSession) -> None:
    """With a key every request needs it (401 otherwise, as JSON); /health does not; the client maps 401."""
    async with local_server(create_app(text_engine, api_key="s3cret-key")) as base:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
            async with session.get(f"{base}/v1/models", headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == "Bearer"
                body = await resp.json()
            assert body["error"]["type"] == "RemoteAuthError" and body["error"]["code"] == "remote_auth"
        async with session.get(f"{base}/health") as resp:
            assert resp.status == 200
        async with session.get(f"{base}/v1/models", headers={"Authorization": "Bearer s3cret-key"}) as resp:
            assert resp.status == 200
        with pytest.raises(RemoteAuthError):
            await OpenAIClient(session, base, "wrong").list_models()
        good = OpenAIClient(session, base, "s3cret-key")
        assert await good.probe() == {"chat"}
        with pytest.raises(RemoteAuthError):
            await OpenAIClient(session, base, "bad key\n").list_models()


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/chat/completions", b"{not json", 400, "invalid_input"),
        ("/v1/chat/completions", [1, 2], 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": []}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": "hola"}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": ["x"]}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "  "}]}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [3]}]}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "file"}]}]}, 400, "invalid_input"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
            400,
            "invalid_input",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.jpg"}}]}
                ]
            },
            400,
            "invalid_input",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": "data:image/png;base64,@@"}]}
                ]
            },
            400,
            "invalid_input",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}],
                    }
                ]
            },
            400,
            "image_invalid",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]}
                ]
            },
            400,
            "invalid_input",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png"}}]}
                ]
            },
            400,
            "invalid_input",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 7}]}]},
            400,
            "invalid_input",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "aGVsbG8=", "format": "wav"}}],
                    }
                ]
            },
            400,
            "audio_invalid",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "aGVsbG8=", "format": "mp3"}}],
                    }
                ]
            },
            400,
            "audio_invalid",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": "x"}]}]},
            400,
            "invalid_input",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": 5}}]}]},
            400,
            "invalid_input",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": ""}}]}]},
            400,
            "invalid_input",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "audio_url", "audio_url": {"url": "data:audio/mpeg;base64,aGk="}}],
                    }
                ]
            },
            400,
            "audio_invalid",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "video_url", "video_url": {"url": "data:image/png;base64,aGk="}}],
                    }
                ]
            },
            400,
            "video_invalid",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}],
                    }
                ]
            },
            400,
            "invalid_input",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_audio", "input_audio": {"data": _b64(tone_wav(0.2))}},
                            {"type": "input_audio", "input_audio": {"data": _b64(tone_wav(0.2))}},
                        ],
                    }
                ]
            },
            400,
            "invalid_input",
        ),
        ("/v1/chat/completions", {"messages": _user("x"), "temperature": 9}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": _user("x"), "temperature": "hot"}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": _user("x"), "max_tokens": True}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": _user("x"), "max_completion_tokens": 0}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": _user("x"), "stream": "yes"}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": _user("x"), "n": 2}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": _user("x"), "tool_choice": "required"}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": _user("x"), "tools": {}}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": _user("x"), "tools": [{"type": "retrieval"}]}, 400, "invalid_input"),
        (
            "/v1/chat/completions",
            {"messages": _user("x"), "tools": [{"function": {"name": "a b"}}]},
            400,
            "invalid_input",
        ),
        (
            "/v1/chat/completions",
            {"messages": _user("x"), "tools": [{"function": {"name": "ok", "parameters": []}}]},
            400,
            "invalid_input",
        ),
        ("/v1/chat/completions", {"messages": _user("x"), "response_format": "json"}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": _user("x"), "response_format": {"type": "xml"}}, 400, "invalid_input"),
        (
            "/v1/chat/completions",
            {"messages": _user("x"), "response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
            400,
            "invalid_input",
        ),
        (
            "/v1/chat/completions",
            {"messages": _user("x"), "response_format": {"type": "json_object", "schema": []}},
            400,
            "invalid_input",
        ),
        (
            "/v1/chat/completions",
            {"messages": _user("x"), "response_format": {"type": "json_object", "schema": {"enum": []}}},
            400,
            "structure_invalid",
        ),
        ("/v1/chat/completions", {"messages": _user("x"), "mm_processor_kwargs": []}, 400, "invalid_input"),
        (
            "/v1/chat/completions",
            {"messages": _user("x"), "mm_processor_kwargs": {"use_audio_in_video": "yes"}},
            400,
            "invalid_input",
        ),
        ("/v1/chat/completions", {"messages": _user("x"), "language": 3}, 400, "invalid_input"),
        ("/v1/chat/completions", {"messages": _user("x"), "language": "x" * 40}, 400, "invalid_input"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "assistant", "content": "", "tool_calls": {}}]},
            400,
            "invalid_input",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "a", "arguments": "{x"}}]}]},
            400,
            "invalid_input",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "a", "arguments": "[1]"}}]}]},
            400,
            "invalid_input",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [{}]}]}, 400, "invalid_input"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "tool", "content": "x", "tool_call_id": 1}]},
            400,
            "invalid_input",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": 1}]}, 400, "invalid_input"),
        ("/v1/audio/speech", {"input": ""}, 400, "tts_empty"),
        ("/v1/audio/speech", {"input": 5}, 400, "invalid_input"),
        ("/v1/audio/speech", {"input": "x" * 1001}, 400, "tts_too_long"),
        ("/v1/audio/speech", {"input": "hola", "voice": "alloy"}, 400, "invalid_input"),
        ("/v1/audio/speech", {"input": "hola", "response_format": "mp3"}, 400, "invalid_input"),
        ("/v1/sarai/clip", {"frames": "x"}, 400, "invalid_input"),
        ("/v1/nothing", {}, 404, "invalid_input"),
    ],
)
async def test_bad_requests(
    text_engine: SaraiEngine, session: aiohttp.ClientSession, path: str, body: Any, status: int, code: str
) -> None:
    """Every malformed request is a 4xx with the JSON error format and a precise code; never a traceback."""
    async with local_server(create_app(text_engine)) as base:
        kw: dict[str, Any] = (
            {"data": body, "headers": {"Content-Type": "application/json"}}
            if isinstance(body, bytes)
            else {"json": body}
        )
        async with session.post(f"{base}{path}", **kw) as resp:
            got = await resp.json()
            assert resp.status == status, got
    error = got["error"]
    assert error["code"] == code, got
    assert set(error) == {"message", "type", "code", "param", "placeholders"}
    assert "Traceback" not in error["message"]


async def test_limits_types_and_unsupported(text_engine: SaraiEngine, session: aiohttp.ClientSession) -> None:
    """A body over the limit is 413, a non-JSON body 415, a wrong method 405; what the models cannot do is 400 with
    the capability's key, and the client raises the same class with the same key and placeholders."""
    async with local_server(create_app(text_engine, max_body_bytes=1024 * 1024)) as base:
        async with session.post(f"{base}/v1/chat/completions", json={"messages": _user("x" * 2_000_000)}) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["placeholders"] == {"max_mb": "1"}
        async with session.post(
            f"{base}/v1/chat/completions", data="hola", headers={"Content-Type": "text/plain"}
        ) as resp:
            assert resp.status == 415
        async with session.get(f"{base}/v1/chat/completions") as resp:
            assert resp.status == 405 and (await resp.json())["error"]["type"] == "InvalidInput"
        client = OpenAIClient(session, base)
        with pytest.raises(UnsupportedModality) as err:
            [c async for c in client.speech("hola")]
        assert err.value.translation_key == "unsupported_speak" and err.value.placeholders == {"capability": "speak"}
        with pytest.raises(UnsupportedModality) as err:
            await client.describe_image(make_jpeg(), "¿Qué ves?")
        assert err.value.translation_key == "unsupported_see"
        with pytest.raises(UnsupportedModality) as err:
            await client.describe_video(b"\x00\x00\x00\x18ftypmp42", "¿Qué pasa?")
        assert err.value.translation_key == "unsupported_video"
        with pytest.raises(UnsupportedModality):
            await client.describe_clip(np.zeros((2, 32, 32, 3), np.uint8), 2.0, None, "?")
        with pytest.raises(ContextOverflow) as overflow:
            await client._answer(ChatRequest([ChatMessage("user", "palabra " * 600)], max_tokens=4), [])
        assert overflow.value.placeholders["n_ctx"] == "512"
        # The next request works.
        assert isinstance(await client._answer(ChatRequest([ChatMessage("user", "hola")], max_tokens=4), []), str)


async def test_disconnect_stops_generation(gguf_path: str, session: aiohttp.ClientSession, caplog) -> None:
    """A client that goes away mid-stream stops the generation at its next token; the next request works."""
    eng = SaraiEngine(EngineConfig(gguf_model=gguf_path, n_ctx=4096))
    try:
        async with local_server(create_app(eng)) as base:
            # Greedy, this prompt runs the tiny model to any max_tokens (no end-of-text): only a stop ends it early.
            body = {"messages": _user("cuenta hasta mil"), "max_tokens": 3000, "temperature": 0, "stream": True}
            resp = await session.post(f"{base}/v1/chat/completions", json=body)
            assert resp.status == 200
            await resp.content.readany()
            resp.close()  # the client goes away
            for _ in range(200):
                if not any(b.busy for b in eng.status().backends):
                    break
                await asyncio.sleep(0.05)
            assert not any(b.busy for b in eng.status().backends)
            assert eng.text.last_generated < 3000
            code, answer = await _post(
                session, base, "/v1/chat/completions", {"messages": _user("hola"), "max_tokens": 4}
            )
            assert code == 200, answer
        assert "went away" in caplog.text
    finally:
        await eng.close()


# -- scripted answers: the wire shape of tool calls, errors after the first token ------------------------------


async def test_tool_calls_and_late_errors_on_the_wire(session: aiohttp.ClientSession) -> None:
    """respond_chat streams tool calls in OpenAI's shape (indexed over the answer); the client accumulates them.
    An error after the first token ends the stream with an error event that the client raises as the same class."""
    script: list[list[Any]] = []

    async def deltas() -> AsyncIterator[ChatDelta]:
        for item in script.pop(0):
            if isinstance(item, EngineError):
                raise item
            yield item

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return await respond_chat(request, deltas(), body.get("stream", False), "scripted")

    app = web.Application(middlewares=[errors_middleware])
    app.router.add_post("/v1/chat/completions", chat)

    async def list_models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "scripted"}]})

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("/secret/path exploded")

    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/boom", boom)
    calls = [ToolCall("c1", "HassTurnOn", {"name": "cocina"}), ToolCall("c2", "HassTurnOff", {"name": "salón"})]
    async with local_server(app) as base:
        client = OpenAIClient(session, base)
        script.append([ChatDelta(content="Vale. "), ChatDelta(tool_calls=calls[:1]), ChatDelta(tool_calls=calls[1:])])
        got = [d async for d in client.chat_stream(ChatRequest([ChatMessage("user", "x")]))]
        assert got[0].content == "Vale. " and got[-1].tool_calls == calls
        script.append([ChatDelta(tool_calls=calls)])
        code, body = await _post(session, base, "/v1/chat/completions", {"stream": False})
        assert code == 200
        message = body["choices"][0]["message"]
        assert body["choices"][0]["finish_reason"] == "tool_calls" and message["content"] is None
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["HassTurnOn", "HassTurnOff"]
        assert json.loads(message["tool_calls"][1]["function"]["arguments"]) == {"name": "salón"}
        script.append([ChatDelta(content="Medio "), RequestTimeout("too slow", timeout_s=5)])
        with pytest.raises(RequestTimeout) as err:
            [d async for d in client.chat_stream(ChatRequest([ChatMessage("user", "x")]))]
        assert err.value.placeholders == {"timeout_s": "5"}
        script.append([InsufficientMemory("text", 900, 100, 1000)])
        with pytest.raises(InsufficientMemory) as mem:
            [d async for d in client.chat_stream(ChatRequest([ChatMessage("user", "x")]))]
        assert (mem.value.needed_mb, mem.value.budget_mb, mem.value.backend) == (900, 1000, "text")
        # SOLAR is any server, a SARAi one too: every failure is a RemoteError there (the engine then answers locally).
        script.append([InsufficientMemory("text", 900, 100, 1000)])
        with pytest.raises(RemoteError, match="HTTP 503") as remote:
            [d async for d in SolarClient(session, base).chat_stream(ChatRequest([ChatMessage("user", "x")]))]
        assert type(remote.value) is RemoteError and "SOLAR server" in str(remote.value)
        async with session.get(f"{base}/boom") as resp:
            assert resp.status == 500
            body = await resp.json()
        assert body["error"]["message"] == "internal server error" and "secret" not in json.dumps(body)


# -- the client against other servers --------------------------------------------------------------------------


async def test_client_against_scripted_solar(solar, session: aiohttp.ClientSession) -> None:
    """The scripted OpenAI server: an OpenAI server that only chats; text, a tool call, faults as RemoteError."""
    client = OpenAIClient(session, solar.url, read_timeout=0.5)
    assert await client.probe() == {"chat"} and client.kind == "openai" and client.model == "solar-test"
    solar.replies = [{"text": "hola que tal"}, {"tool_call": ("HassTurnOn", {"name": "cocina"})}]
    text = "".join([d.content async for d in client.chat_stream(ChatRequest([ChatMessage("user", "x")]))])
    assert text.strip() == "hola que tal"
    deltas = [d async for d in client.chat_stream(ChatRequest([ChatMessage("user", "x")], tools=[LIGHT]))]
    assert deltas[-1].tool_calls[0].name == "HassTurnOn" and solar.requests[-1]["tool_choice"] == "auto"
    schema = {"type": "object"}
    solar.replies = [{"text": "{}"}]
    [d async for d in client.chat_stream(ChatRequest([ChatMessage("user", "x")], json_schema=schema))]
    assert solar.requests[-1]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema},
    }
    for reply, cls, why in [
        ({"status": 500}, RemoteError, "HTTP 500"),
        ({"delay": 2}, RemoteError, "Timeout"),
        ({"stall": 2}, RemoteError, "Timeout"),
        ({"html": "<html/>"}, RemoteProtocolError, "event stream"),
        ({"raw": 'data: {"error": {"message": "overloaded"}}\n\n'}, RemoteError, "overloaded"),
        ({"raw": "data: [1]\n\n"}, RemoteProtocolError, "invalid chunk"),
        ({"raw": 'data: {"choices": [{"delta": "x"}]}\n\n'}, RemoteProtocolError, "invalid delta"),
        ({"raw": 'data: {"choices": [{"delta": {"tool_calls": [1]}}]}\n\n'}, RemoteProtocolError, "tool call"),
        ({"raw": 'data: {"choices": [{"delta": {"tool_calls": [{"index": "x"}]}}]}\n\n'}, RemoteProtocolError, "index"),
        (
            {
                "raw": 'data: {"choices": [{"delta": {"tool_calls": [{"function": {"name": "a", "arguments": "{x"}}]}'
                ', "finish_reason": "tool_calls"}]}\n\n'
            },
            RemoteProtocolError,
            "invalid JSON arguments",
        ),
        ({"raw": "data: {oops\n\n"}, RemoteProtocolError, "invalid JSON in the stream"),
        ({"raw": 'data: {"nothing": 1}\n\n'}, RemoteProtocolError, "without choices"),
        ({"raw": 'data: {"choices": [{"index": 0, "delta": {"content": "sin fin"}}]}'}, RemoteProtocolError, "ended"),
    ]:
        solar.replies = [reply]
        with pytest.raises(cls, match=why):
            [d async for d in client.chat_stream(ChatRequest([ChatMessage("user", "x")]))]
    # The last event without its blank line still counts; arguments sent as an object are accepted.
    solar.replies = [
        {
            "raw": 'data: {"choices": [{"delta": {"tool_calls": [{"function": {"name": "a", "arguments": {"b": 1}}}]}}]'
            "}\n\n"
            'data: {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}'
        }
    ]
    deltas = [d async for d in client.chat_stream(ChatRequest([ChatMessage("user", "x")]))]
    assert deltas[-1].tool_calls[0].arguments == {"b": 1}
    solar.api_key = "right"
    with pytest.raises(RemoteAuthError):
        await client.list_models()
    dead = OpenAIClient(session, "http://127.0.0.1:9/v1")
    with pytest.raises(RemoteError, match="cannot be reached"):
        await dead.list_models()
    dead.model = "m"
    with pytest.raises(RemoteError, match="speech failed"):
        [c async for c in dead.speech("hola")]


async def test_probe_llama_cpp_vllm_and_legacy_json(session: aiohttp.ClientSession) -> None:
    """llama-server's /props modalities, vLLM's Omni model id, listed capabilities; a server that refuses the
    json_schema response_format (llama-cpp-python's) gets the older json_object form, once, then always."""
    state: dict[str, Any] = {"props": None, "models": [], "formats": [], "status": None}

    async def status(request: web.Request) -> web.Response:
        if state["status"] is None:
            return web.Response(status=404, text="no")
        if isinstance(state["status"], str):
            return web.Response(text=state["status"])
        return web.json_response(state["status"])

    async def props(request: web.Request) -> web.Response:
        if state["props"] is None:
            return web.Response(status=404, text="no")
        return web.json_response(state["props"])

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": state["models"]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["messages"][-1]["content"] == "fail":
            return web.json_response({"error": {"message": "context too long"}}, status=400)
        if body["messages"][-1]["content"] == "failtext":
            return web.Response(status=400, text="nope")
        fmt = body.get("response_format") or {}
        state["formats"].append(fmt.get("type"))
        if fmt.get("type") == "json_schema":
            msg = "Input should be 'text' or 'json_object' (response_format, input: json_schema)"
            return web.json_response({"error": {"message": msg, "type": "internal_server_error"}}, status=500)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b': comment\r\ndata: {"choices": [{"delta": {"content": "{}"}}]}\r\n\r\n')
        await resp.write(b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\r\n\r\ndata: [DONE]\r\n\r\n')
        return resp

    app = web.Application()
    app.router.add_get("/props", props)
    app.router.add_get("/v1/sarai/status", status)

    async def clip(request: web.Request) -> web.Response:
        return web.json_response({"nope": 1})

    app.router.add_post("/v1/sarai/clip", clip)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    async with local_server(app) as base:
        state["props"] = {"modalities": {"vision": True, "audio": True}}
        state["models"] = [{"id": "qwen", "object": "model"}]
        state["status"] = "not json"  # a server whose /v1/sarai/status is something else: not SARAi
        client = OpenAIClient(session, f"{base}/v1/")
        assert await client.probe() == {"chat", "see", "hear"} and client.kind == "llama.cpp"
        state["status"] = None
        with pytest.raises(RemoteProtocolError, match="no text"):
            await client.describe_clip(np.zeros((1, 8, 8, 3), np.uint8), 1.0, np.zeros(1600, np.float32), "?")
        state["props"] = None
        state["models"] = [{"id": "Qwen/Qwen2.5-Omni-7B", "owned_by": "vllm"}]
        client = OpenAIClient(session, base)
        assert await client.probe() == {"chat", "hear", "see", "video"} and client.kind == "vllm"
        state["models"] = [{"id": "m", "capabilities": ["chat", "see", "fly"]}]
        assert await OpenAIClient(session, base).probe() == {"chat", "see"}
        state["models"] = [{"id": "plain"}]
        assert await OpenAIClient(session, base).probe() == {"chat"}
        state["models"] = [{"name": "no id"}]
        with pytest.raises(RemoteProtocolError):
            await OpenAIClient(session, base).probe()

        schema = {"type": "object"}
        request = ChatRequest([ChatMessage("user", "x")], json_schema=schema)
        assert "".join([d.content async for d in client.chat_stream(request)]) == "{}"
        assert state["formats"] == ["json_schema", "json_object"]
        assert "".join([d.content async for d in client.chat_stream(request)]) == "{}"
        assert state["formats"][-1] == "json_object"
        with pytest.raises(RemoteError, match="HTTP 400: context too long"):
            [d async for d in client.chat_stream(ChatRequest([ChatMessage("user", "fail")]))]
        fresh2 = OpenAIClient(session, base)
        fresh2.model = "m"
        with pytest.raises(RemoteError, match="HTTP 400: context too long"):
            [d async for d in fresh2.chat_stream(ChatRequest([ChatMessage("user", "fail")], json_schema=schema))]
        with pytest.raises(RemoteError, match="HTTP 400: nope"):
            [d async for d in fresh2.chat_stream(ChatRequest([ChatMessage("user", "failtext")], json_schema=schema))]
        state["status"] = "not json"
        with pytest.raises(RemoteProtocolError, match="did not answer JSON"):
            await fresh2.sarai_status()
        state["status"] = [1]
        with pytest.raises(RemoteProtocolError, match="not an object"):
            await fresh2.sarai_status()


# -- pieces on their own -----------------------------------------------------------------------------------------


def test_sse_parser() -> None:
    """Partial lines, CRLF and CR (split across chunks), comments, multi-line data, error fields, a last event
    without its blank line."""
    parser = SSEParser()
    assert parser.feed(b"da") == []
    assert parser.feed(b"ta: one\r") == []
    assert parser.feed(b"\n\r\n: comment\nevent: x\nid: 3\ndata:two\ndata: lines\n\n") == ["one", "two\nlines"]
    assert parser.feed(b"data: three\r\rdata: caf\xc3") == ["three"]
    assert parser.feed(b'\xa9\n\nerror: {"message": "boom"}\n\nerror: plain\n\n') == [
        "café",
        json.dumps({"error": {"message": "boom"}}),
        json.dumps({"error": "plain"}),
    ]
    assert parser.feed(b"data: tail") == []
    assert parser.finish() == ["tail"]
    assert parser.finish() == []


def test_error_format_round_trip() -> None:
    """Each error class keeps its class, key and placeholders across the wire; paths never cross it."""
    cases: list[EngineError] = [
        InvalidInput("bad image", key="image_invalid"),
        UnsupportedModality("no speech", capability="speak"),
        ContextOverflow("too long", tokens=900, n_ctx=512),
        InsufficientMemory("omni", 2000, 100, 1000),
        DependencyMissing("torch"),
        ModelMissing("cannot stat /media/models/secret/x.gguf: No such file", path="/media/models/secret/x.gguf"),
        RequestTimeout("slow", timeout_s=3),
        RemoteAuthError("nope", status=401),
        EngineError("boom\nTraceback (most recent call last):"),
    ]
    statuses = [400, 400, 400, 503, 503, 503, 504, 401, 500]
    for err, status in zip(cases, statuses, strict=True):
        body = error_body(err)
        assert error_status(err) == status
        assert "/media" not in json.dumps(body) and "Traceback" not in json.dumps(body)
        back = sarai_error(status, json.loads(json.dumps(body)))
        assert type(back) is type(err) and back.translation_key == err.translation_key
        assert back.placeholders == err.placeholders
    assert error_body(cases[5])["error"]["message"] == "cannot stat x.gguf: No such file"
    back = sarai_error(503, error_body(cases[4]))
    assert isinstance(back, DependencyMissing) and back.package == "torch"
    too_large = InvalidInput("big")
    too_large.http_status = 413  # type: ignore[attr-defined]
    assert error_status(sarai_error(413, error_body(too_large))) == 413  # type: ignore[arg-type]
    assert sarai_error(500, {"error": {"type": "NoSuchError", "code": "x"}}) is None
    assert sarai_error(500, {"error": "text"}) is None
    assert sarai_error(500, [1]) is None
    assert safe_message("") == ""
    assert safe_message("open '/a/b/' failed") == "open '<path>' failed"


async def test_client_edges(session: aiohttp.ClientSession) -> None:
    """URL and key checks, error texts of other servers, media without a user message, an exhausted deadline."""
    from custom_components.sarai.engine.openai_client import redact_url, validate_api_key, validate_url

    assert validate_url(" http://h:1/v1 ") == "http://h:1/v1"
    for bad_url in ("", "ftp://h", "http://h:99999", "http://a b"):
        with pytest.raises(InvalidInput):
            validate_url(bad_url)
    assert validate_api_key("") is None and validate_api_key("k") == "k"
    for bad_key in ("a b", "ñandú€"):
        with pytest.raises(InvalidInput):
            validate_api_key(bad_key)
    assert redact_url("http://u:p@h/v1?k=1#f") == "http://h/v1" and redact_url("nohost") == "**REDACTED**"
    client = OpenAIClient(session, "http://127.0.0.1:9")
    assert "{'code': 1}" in str(client._map_error(500, {"error": {"code": 1}}, ""))
    assert "plain" in str(client._map_error(500, {"error": "plain"}, ""))
    assert "<html>" in str(client._map_error(502, None, "<html>"))
    payload = client._payload(ChatRequest([ChatMessage("system", "s")]), [("image", make_jpeg())], None)
    assert payload["messages"][-1]["role"] == "user" and payload["messages"][-1]["content"][0]["type"] == "image_url"
    with pytest.raises(TimeoutError):
        await client._read_chunk(None, 0)  # type: ignore[arg-type]


def test_media_helpers_and_sentences() -> None:
    """MIME sniffing, content parts, sentence splitting."""
    assert image_mime(b"\x89PNG....") == "image/png"
    assert image_mime(b"RIFF0000WEBP") == "image/webp"
    assert image_mime(b"GIF89a") == "image/gif"
    assert image_mime(b"BMxx") == "image/bmp"
    assert image_mime(b"\xff\xd8") == "image/jpeg"
    assert video_mime(b"\x1a\x45\xdf\xa3") == "video/webm"
    assert media_part("video", b"x")["video_url"]["url"].startswith("data:video/mp4;base64,")
    with pytest.raises(InvalidInput):
        media_part("smell", b"x")
    assert split_sentences("Hola. ¿Qué tal? Bien", final=True)[0] == ["Hola.", "¿Qué tal?", "Bien"]
    long = split_sentences("palabra " * 60 + "x" * 450, final=True)[0]
    assert all(len(s) <= 200 for s in long) and "".join(long).replace(" ", "").count("x") == 450


def test_command_line_refusals(gguf_path: str, capsys) -> None:
    """Unsafe or impossible settings stop before anything is loaded, with exit code 2 and a clear message."""
    assert main(["--gguf", gguf_path, "--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err
    assert main(["--gguf", gguf_path, "--api-key", "two words"]) == 2
    assert main(["--gguf", gguf_path, "--port", "70000"]) == 2
    assert "invalid port" in capsys.readouterr().err
    assert main(["--gguf", gguf_path + ".missing", "--port", "0"]) == 1  # the engine cannot start
    assert "sarai engine server:" in capsys.readouterr().err


async def test_serve_in_process(gguf_path: str, tmp_path: Path, session: aiohttp.ClientSession, capsys) -> None:
    """serve(): announces the port, answers with the key, stops on its event; a Unix socket; failures exit 1."""
    args = build_parser().parse_args(["--gguf", gguf_path, "--port", "0", "--ctx", "1024", "--warmup"])
    stop = asyncio.Event()
    task = asyncio.create_task(serve(args, "k3y", stop))
    line = ""
    for _ in range(400):
        line = capsys.readouterr().out.strip()
        if line or task.done():
            break
        await asyncio.sleep(0.05)
    announce = json.loads(line)
    assert announce["event"] == "listening" and announce["host"] == "127.0.0.1"
    client = OpenAIClient(session, f"http://127.0.0.1:{announce['port']}", "k3y")
    assert await client.probe() == {"chat"}
    assert isinstance(await client._answer(ChatRequest([ChatMessage("user", "hola")], max_tokens=4), []), str)
    stop.set()
    assert await task == 0
    assert "k3y" not in capsys.readouterr().err

    sock = tmp_path / "sarai.sock"
    args = build_parser().parse_args(["--gguf", gguf_path, "--unix-socket", str(sock), "--ctx", "512"])
    stop = asyncio.Event()
    task = asyncio.create_task(serve(args, None, stop))
    for _ in range(400):
        if sock.exists() or task.done():
            break
        await asyncio.sleep(0.05)
    assert oct(sock.stat().st_mode & 0o777) == "0o600"  # only its owner may connect (the harness allows no client)
    stop.set()
    assert await task == 0

    args = build_parser().parse_args(["--gguf", gguf_path, "--unix-socket", str(tmp_path / "no" / "s.sock")])
    assert await serve(args, None, asyncio.Event()) == 1
    assert "cannot listen" in capsys.readouterr().err
    args = build_parser().parse_args(["--gguf", str(tmp_path / "missing.gguf")])
    assert await serve(args, None, asyncio.Event()) == 1


# -- a real child process -------------------------------------------------------------------------------------


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SARAI_API_KEY"}
    env["PYTHONPATH"] = ENGINE_PARENT
    env.update(extra)
    return env


async def test_subprocess_refuses_off_loopback_without_key(gguf_path: str) -> None:
    """``--host 0.0.0.0`` without a key: exit code 2 and a message on stderr, before any model is loaded."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine.server",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--gguf",
        gguf_path,
        env=_child_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 2, err.decode()
    assert b"without an API key" in err and out == b""


async def test_subprocess_end_to_end(
    gguf_path: str, omni_path: str, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """A real server process: port line, chat and speech through OpenAIClient, SIGTERM -> exit 0, nothing left."""
    log = tmp_path / "server.log"
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engine.server",
            "--port",
            "0",
            "--gguf",
            gguf_path,
            "--omni",
            omni_path,
            "--omni-dtype",
            "float32",
            "--ctx",
            "1024",
            env=_child_env(SARAI_API_KEY="child-secret"),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 180)
        announce = json.loads(line or b"null")
        assert announce and announce["event"] == "listening", log.read_text()[-3000:]
        client = OpenAIClient(session, f"http://127.0.0.1:{announce['port']}/v1", "child-secret", read_timeout=120)
        assert {"chat", "speak", "video"} <= await client.probe()
        text = "".join(
            [d.content async for d in client.chat_stream(ChatRequest([ChatMessage("user", "hola")], max_tokens=6))]
        )
        assert isinstance(text, str)
        pcm = b"".join([c async for c in client.speech("Hola.", "Chelsie")])
        assert len(pcm) % 2 == 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0, log.read_text()[-3000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    logged = log.read_text()
    assert "child-secret" not in logged and "Stopped" in logged
