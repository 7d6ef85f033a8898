"""vLLM serving Qwen2.5-Omni as SARAi's inference server, end to end through Home Assistant.

vLLM needs a GPU and cannot run here: ``VLLMServer`` is an aiohttp server on 127.0.0.1 that answers like
vLLM's OpenAI server and checks requests as strictly as it does. It lists its model ``owned_by: vllm``, serves
nothing SARAi-specific (``/v1/sarai/*`` and llama.cpp's ``/props`` are 404), wants the served model's name,
accepts only the content parts vLLM knows (``text``, ``image_url``, ``input_audio``, ``video_url``,
``audio_url``), decodes every media part (a JPEG/PNG, a WAV, an MP4 that PyAV can open), allows one video
and one audio per prompt, hears a video only with ``mm_processor_kwargs.use_audio_in_video`` and only when
it has a sound track, wants ``response_format`` in the standard ``json_schema`` form (with ``name``), and
refuses ``tool_choice: "auto"`` unless started with ``--enable-auto-tool-choice --tool-call-parser hermes``.
It streams chat completions the way vLLM does (role chunk, content chunks, tool calls with their arguments in
pieces, a final chunk with ``finish_reason``, ``[DONE]``).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
import io
import json
import logging
from typing import Any
import wave

from aiohttp import web
from homeassistant.components import conversation, stt
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import issue_registry as ir
from homeassistant.setup import async_setup_component
import pytest

from custom_components.sarai.const import DOMAIN
from tests.common import add_camera_analysis, chunked, local_server, setup_entry, speech_metadata, tone_wav

pytestmark = pytest.mark.usefixtures("ha_core", "socket_enabled")

MODEL = "Qwen/Qwen2.5-Omni-7B"
PART_TYPES = {"text", "image_url", "input_audio", "video_url", "audio_url"}
LIMITS = {"image": 4, "audio": 1, "video": 1}  # --limit-mm-per-prompt
RESPONSE_FORMATS = {"text", "json_object", "json_schema", "structural_tag"}


class Rejected(Exception):
    """What vLLM answers with a 4xx error."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _b64(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except ValueError as err:
        raise Rejected(f"{where}: invalid base64") from err


def _data_url(url: Any, mime_prefix: str, where: str) -> bytes:
    if not isinstance(url, str):
        raise Rejected(f"{where}.url must be a string")
    if url.startswith(("http://", "https://")):
        raise Rejected(f"{where}: this test server does not fetch URLs")
    head, sep, data = url.partition(",")
    if not sep or not head.startswith(f"data:{mime_prefix}") or not head.endswith(";base64"):
        raise Rejected(f"{where}: expected a data:{mime_prefix}...;base64 URL")
    return _b64(data, where)


def _check_image(data: bytes, where: str) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Exception as err:
        raise Rejected(f"{where}: cannot identify image file") from err


def _check_wav(data: bytes, where: str) -> dict[str, int]:
    try:
        with wave.open(io.BytesIO(data)) as w:
            return {"rate": w.getframerate(), "channels": w.getnchannels(), "frames": w.getnframes()}
    except (wave.Error, EOFError) as err:
        raise Rejected(f"{where}: not a WAV file") from err


def _check_video(data: bytes, where: str) -> dict[str, Any]:
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise Rejected(f"{where}: no video stream")
            frames = sum(1 for _ in container.decode(video=0))
        with av.open(io.BytesIO(data)) as container:
            audio = bool(container.streams.audio) and any(True for _ in container.decode(audio=0))
            return {"format": container.format.name, "frames": frames, "audio": audio}
    except av.error.FFmpegError as err:
        raise Rejected(f"{where}: cannot decode the video") from err


class VLLMServer:
    """vLLM's OpenAI-compatible server, as far as SARAi uses it; ``replies`` scripts the answers."""

    def __init__(self, *, auto_tool_choice: bool = True) -> None:
        self.api_key = "vllm-key"
        self.auto_tool_choice = auto_tool_choice
        self.replies: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.media: list[list[dict[str, Any]]] = []  # per accepted request: what each media part held
        self.rejected: list[str] = []
        self.url = ""

    def _auth(self, request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            raise Rejected("Unauthorized", 401)

    @staticmethod
    def _error(err: Rejected) -> web.Response:
        kind = {401: "Unauthorized", 404: "NotFoundError"}.get(err.status, "BadRequestError")
        body = {"error": {"message": str(err), "type": kind, "param": None, "code": err.status}}
        return web.json_response({"error": "Unauthorized"} if err.status == 401 else body, status=err.status)

    async def models(self, request: web.Request) -> web.Response:
        try:
            self._auth(request)
        except Rejected as err:
            return self._error(err)
        model = {"id": MODEL, "object": "model", "created": 1, "owned_by": "vllm", "root": MODEL, "parent": None}
        return web.json_response({"object": "list", "data": [{**model, "max_model_len": 8192, "permission": []}]})

    async def not_found(self, request: web.Request) -> web.Response:
        if request.path.startswith("/v1"):
            try:
                self._auth(request)
            except Rejected as err:
                return self._error(err)
        return web.json_response({"detail": "Not Found"}, status=404)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            self._auth(request)
            try:
                body = await request.json()
            except ValueError as err:
                raise Rejected("invalid JSON body") from err
            media = self._validate(body)
        except Rejected as err:
            self.rejected.append(str(err))
            return self._error(err)
        self.requests.append(body)
        self.media.append(media)
        reply = self.replies.pop(0) if self.replies else {"text": "Veo una puerta."}
        return await self._stream(request, body, reply)

    def _validate(self, body: Any) -> list[dict[str, Any]]:
        """Reject what vLLM rejects; return what the media parts held."""
        if not isinstance(body, dict):
            raise Rejected("the body must be an object")
        if body.get("model") != MODEL:
            raise Rejected(f"The model `{body.get('model')}` does not exist.", 404)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Rejected("messages must be a non-empty list")
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
            raise Rejected("max_tokens must be a positive integer")
        if body.get("stream") is not True:
            raise Rejected("SARAi always streams")
        tool_names = self._validate_tools(body)
        mm = body.get("mm_processor_kwargs")
        if mm is not None and (not isinstance(mm, dict) or set(mm) - {"use_audio_in_video", "fps"}):
            raise Rejected("mm_processor_kwargs must be an object of processor arguments")
        media: list[dict[str, Any]] = []
        counts = dict.fromkeys(LIMITS, 0)
        for i, message in enumerate(messages):
            media += self._validate_message(message, f"messages[{i}]", tool_names, counts)
        for modality, count in counts.items():
            if count > LIMITS[modality]:
                raise Rejected(f"At most {LIMITS[modality]} {modality}(s) may be provided in one prompt.")
        if mm and mm.get("use_audio_in_video"):
            videos = [m for m in media if m["kind"] == "video"]
            if len(videos) != 1 or not videos[0]["audio"]:
                raise Rejected("use_audio_in_video needs one video with an audio track")
        fmt = body.get("response_format")
        if fmt is not None:
            if not isinstance(fmt, dict) or fmt.get("type") not in RESPONSE_FORMATS:
                raise Rejected("response_format.type must be text, json_object, json_schema or structural_tag")
            if fmt["type"] == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                    raise Rejected("response_format.json_schema needs a name")
                if not isinstance(spec.get("schema"), dict):
                    raise Rejected("response_format.json_schema.schema must be an object")
        return media

    def _validate_tools(self, body: dict[str, Any]) -> set[str]:
        tools = body.get("tools")
        if tools is None:
            return set()
        if not isinstance(tools, list):
            raise Rejected("tools must be a list")
        names: set[str] = set()
        for tool in tools:
            fn = tool.get("function") if isinstance(tool, dict) else None
            if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise Rejected("each tool must be {type: function, function: {name, ...}}")
            if "parameters" in fn and not isinstance(fn["parameters"], dict):
                raise Rejected("tool parameters must be a JSON schema object")
            names.add(fn["name"])
        if body.get("tool_choice", "auto") == "auto" and not self.auto_tool_choice:
            raise Rejected('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
        return names

    def _validate_message(
        self, message: Any, where: str, tool_names: set[str], counts: dict[str, int]
    ) -> list[dict[str, Any]]:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
            raise Rejected(f"{where}.role must be system, user, assistant or tool")
        if message["role"] == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise Rejected(f"{where}: a tool message needs its tool_call_id")
        for call in message.get("tool_calls") or []:
            fn = call.get("function") or {}
            if (
                message["role"] != "assistant"
                or not isinstance(call.get("id"), str)
                or fn.get("name") not in tool_names
            ):
                raise Rejected(f"{where}.tool_calls: an assistant's call of an offered tool, with an id")
            try:
                json.loads(fn.get("arguments"))
            except (TypeError, ValueError) as err:
                raise Rejected(f"{where}.tool_calls: arguments must be a JSON string") from err
        content = message.get("content")
        if content is None or isinstance(content, str):
            return []
        if not isinstance(content, list) or message["role"] != "user":
            raise Rejected(f"{where}.content must be a string, or a list of parts in a user message")
        media: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PART_TYPES:
                raise Rejected(f"{at}.type {kind!r} is not a known content part")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise Rejected(f"{at}.text must be a string")
            elif kind == "image_url":
                data = _data_url((part.get("image_url") or {}).get("url"), "image/", f"{at}.image_url")
                _check_image(data, at)
                counts["image"] += 1
                media.append({"kind": "image", "bytes": len(data)})
            elif kind == "input_audio":
                audio = part.get("input_audio") or {}
                if audio.get("format") not in ("wav", "mp3") or not isinstance(audio.get("data"), str):
                    raise Rejected(f"{at}.input_audio needs base64 data and a format (wav, mp3)")
                counts["audio"] += 1
                media.append({"kind": "audio", **_check_wav(_b64(audio["data"], at), at)})
            elif kind == "video_url":
                data = _data_url((part.get("video_url") or {}).get("url"), "video/", f"{at}.video_url")
                counts["video"] += 1
                media.append(
                    {"kind": "video", "mime": part["video_url"]["url"].split(";")[0], **_check_video(data, at)}
                )
            else:
                raise Rejected(f"{at}: audio_url is not used by SARAi")
        return media

    @staticmethod
    async def _stream(request: web.Request, body: dict[str, Any], reply: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)

        async def chunk(delta: dict[str, Any], finish: str | None = None) -> None:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL}
            await resp.write(f"data: {json.dumps({**obj, 'choices': [choice]})}\n\n".encode())

        await chunk({"role": "assistant", "content": ""})
        if "tool_call" in reply:
            wanted, args = reply["tool_call"]
            names = [t["function"]["name"] for t in body.get("tools", [])]
            name = next(n for n in names if n.endswith(wanted))
            call = {"id": "chatcmpl-tool-1", "type": "function", "index": 0, "function": {"name": name}}
            await chunk({"tool_calls": [call]})
            text = json.dumps(args)
            for piece in (text[: len(text) // 2], text[len(text) // 2 :]):
                await chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            await chunk({"content": ""}, "tool_calls")
        else:
            text = json.dumps(reply["json"]) if "json" in reply else reply["text"]
            for i in range(0, len(text), 7):
                await chunk({"content": text[i : i + 7]})
            await chunk({"content": ""}, "stop")
        await resp.write(b"data: [DONE]\n\n")
        return resp


async def _vllm(auto_tool_choice: bool = True) -> AsyncIterator[VLLMServer]:
    server = VLLMServer(auto_tool_choice=auto_tool_choice)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/v1/models", server.models)
    app.router.add_post("/v1/chat/completions", server.chat)
    app.router.add_route("*", "/{tail:.*}", server.not_found)
    async with local_server(app) as url:
        server.url = f"{url}/v1"
        yield server


@pytest.fixture
async def vllm() -> AsyncIterator[VLLMServer]:
    """vLLM started with --enable-auto-tool-choice --tool-call-parser hermes (as the README says)."""
    async for server in _vllm():
        yield server


@pytest.fixture
async def vllm_without_tool_parser() -> AsyncIterator[VLLMServer]:
    """vLLM started without the tool-calling flags."""
    async for server in _vllm(auto_tool_choice=False):
        yield server


async def _setup(hass: HomeAssistant, make_entry: Any, server: VLLMServer, **options: Any) -> Any:
    entry = make_entry(
        {"placement": "server", "server_url": server.url, "server_api_key": server.api_key, "gguf_model": ""},
        {"llm_hass_api": [], **options},
    )
    await setup_entry(hass, entry)
    return entry


def _parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    content = body["messages"][-1]["content"]
    return content if isinstance(content, list) else []


async def test_vllm_entities_and_the_repair(
    hass: HomeAssistant, make_entry, vllm: VLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    """vLLM is probed as such: chat, hearing, seeing and clips; no speech, so no TTS entity, and the log and a
    repair say so; diagnostics name the server kind."""
    caplog.set_level(logging.INFO, logger="custom_components.sarai")
    entry = await _setup(hass, make_entry, vllm)
    remote = entry.runtime_data.engine.remote
    assert remote.server_kind == "vllm" and remote.model == MODEL
    assert remote.capabilities == ["chat", "hear", "see", "video"]
    assert hass.states.get("tts.sarai_text_to_speech") is None
    assert hass.states.get("stt.sarai_speech_to_text") is not None
    assert hass.states.get("conversation.sarai") is not None
    issue = ir.async_get(hass).async_get_issue(DOMAIN, "server_capabilities")
    assert issue is not None and issue.translation_placeholders == {"server": "vllm", "missing": "speak"}
    assert "The vllm server does not serve speak" in caplog.text
    assert await remote.refresh_status() == {}  # no SARAi status endpoint: nothing asked
    assert not vllm.rejected
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_vllm_conversation_runs_a_tool(hass: HomeAssistant, make_entry, vllm: VLLMServer) -> None:
    """vLLM's hermes parser streams a tool call in pieces; Home Assistant runs it; the tool's result goes
    back with the call's id; the answer is spoken."""
    assert await async_setup_component(hass, "intent", {})
    assert await async_setup_component(hass, "input_boolean", {"input_boolean": {"kitchen": {"name": "Kitchen"}}})
    async_expose_entity(hass, "conversation", "input_boolean.kitchen", True)
    entry = await _setup(hass, make_entry, vllm, llm_hass_api=["assist"])
    vllm.replies = [{"tool_call": ("HassTurnOn", {"name": "Kitchen"})}, {"text": "Listo, cocina encendida."}]
    result = await conversation.async_converse(
        hass, "enciende la cocina", None, Context(), agent_id="conversation.sarai"
    )
    assert hass.states.get("input_boolean.kitchen").state == "on"
    assert "Listo" in result.response.speech["plain"]["speech"]
    first, second = vllm.requests
    assert first["tool_choice"] == "auto" and any(t["function"]["name"].endswith("HassTurnOn") for t in first["tools"])
    assert [m["role"] for m in second["messages"][-2:]] == ["assistant", "tool"]
    assert second["messages"][-2]["tool_calls"][0]["id"] == "chatcmpl-tool-1"
    assert second["messages"][-1]["tool_call_id"] == "chatcmpl-tool-1"
    assert not vllm.rejected
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_vllm_without_the_tool_parser_fails_the_turn_cleanly(
    hass: HomeAssistant, make_entry, vllm_without_tool_parser: VLLMServer
) -> None:
    """vLLM started without --enable-auto-tool-choice refuses every request with tools: the turn ends with
    an error response (not a traceback); without the Assist API the same server answers."""
    server = vllm_without_tool_parser
    entry = await _setup(hass, make_entry, server, llm_hass_api=["assist"])
    result = await conversation.async_converse(hass, "hola", None, Context(), agent_id="conversation.sarai")
    assert result.response.response_type.value == "error"
    assert server.rejected and "enable-auto-tool-choice" in server.rejected[0]
    assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.config_entries.async_remove(entry.entry_id)
    entry = await _setup(hass, make_entry, server)
    result = await conversation.async_converse(hass, "hola", None, Context(), agent_id="conversation.sarai")
    assert result.response.response_type.value != "error"
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_vllm_hears_sees_and_structures(hass: HomeAssistant, make_entry, vllm: VLLMServer, front_door) -> None:
    """Speech-to-text sends one WAV ``input_audio`` part (and no SARAi-only field); a camera analysis sends a
    JPEG ``image_url`` data URL; an AI Task structure goes as the standard ``json_schema`` response format."""
    from homeassistant.components import ai_task
    import probatio as vol

    entry = make_entry(
        {"placement": "server", "server_url": vllm.url, "server_api_key": vllm.api_key, "gguf_model": ""},
        {"llm_hass_api": []},
    )
    entry.add_to_hass(hass)
    add_camera_analysis(hass, entry)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()

    vllm.replies = [{"text": "enciende la luz"}]
    stt_entity = hass.data[stt.DATA_COMPONENT].get_entity("stt.sarai_speech_to_text")
    heard = await stt_entity.async_process_audio_stream(speech_metadata(), chunked(tone_wav()))
    assert heard.result is stt.SpeechResultState.SUCCESS and heard.text == "enciende la luz"
    body = vllm.requests[-1]
    assert [p["type"] for p in _parts(body)] == ["input_audio", "text"]
    assert _parts(body)[0]["input_audio"]["format"] == "wav"
    assert vllm.media[-1] == [{"kind": "audio", "rate": 16000, "channels": 1, "frames": 16000}]
    assert "language" not in body

    vllm.replies = [{"text": "Sí, hay una persona."}]
    entity_id = "image_processing.front_door_analysis"
    await hass.services.async_call("image_processing", "scan", {"entity_id": entity_id}, blocking=True)
    assert hass.states.get(entity_id).attributes["description"] == "Sí, hay una persona."
    image = _parts(vllm.requests[-1])[0]
    assert image["type"] == "image_url" and image["image_url"]["url"].startswith("data:image/jpeg;base64,")

    vllm.replies = [{"json": {"color": "rojo"}}]
    result = await ai_task.async_generate_data(
        hass,
        task_name="color",
        entity_id="ai_task.sarai_ai_task",
        instructions="¿De qué color es la puerta?",
        structure=vol.Schema({vol.Required("color"): str}),
    )
    assert result.data == {"color": "rojo"}
    fmt = vllm.requests[-1]["response_format"]
    assert fmt["type"] == "json_schema" and set(fmt) == {"type", "json_schema"}
    assert isinstance(fmt["json_schema"]["name"], str)
    assert fmt["json_schema"]["schema"]["required"] == ["color"]
    assert not vllm.rejected
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_vllm_watches_and_hears_a_clip(hass: HomeAssistant, make_entry, vllm: VLLMServer, clip_path) -> None:
    """sarai.analyze_video on vLLM: ONE ``video_url`` part, an MP4 with the clip's picture and sound, and
    ``use_audio_in_video``; never SARAi's clip extension or separate frames. Without sound, no audio flag."""
    hass.config.allowlist_external_dirs = {str(clip_path.parent)}
    entry = await _setup(hass, make_entry, vllm)
    event = {"label": "person", "confidence": 0.9, "start_s": 2.0, "end_s": 3.0, "description": "una persona"}
    vllm.replies = [{"text": "Una persona cruza y suena un pitido."}, {"json": {"events": [event]}}]
    result = await hass.services.async_call(
        DOMAIN,
        "analyze_video",
        {"file_path": str(clip_path), "duration": 3, "events": ["person"]},
        blocking=True,
        return_response=True,
    )
    assert result["route"] == "omni_video_audio" and result["summary"] == "Una persona cruza y suena un pitido."
    assert [e["label"] for e in result["events"]] == ["person"]
    clip, events = vllm.requests
    assert [p["type"] for p in _parts(clip)] == ["video_url", "text"]
    assert clip["mm_processor_kwargs"] == {"use_audio_in_video": True}
    (video,) = vllm.media[0]
    assert video["mime"] == "data:video/mp4" and video["audio"] and video["frames"] == result["frames"]
    assert events["response_format"]["type"] == "json_schema" and "mm_processor_kwargs" not in events

    vllm.replies = [{"text": "Nadie."}, {"json": {"events": []}}]
    result = await hass.services.async_call(
        DOMAIN,
        "analyze_video",
        {"file_path": str(clip_path), "duration": 2, "with_audio": False},
        blocking=True,
        return_response=True,
    )
    assert result["route"] == "omni_video_only"
    assert "mm_processor_kwargs" not in vllm.requests[2] and not vllm.media[2][0]["audio"]
    assert not vllm.rejected
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_the_test_server_rejects_what_vllm_rejects(hass: HomeAssistant, vllm: VLLMServer, clip_path) -> None:
    """The checks above mean something: this server refuses SARAi's own extensions and the shapes vLLM
    refuses (another model name, two videos, audio-in-video without sound, a json_schema without a name, a
    content part it does not know, a WAV that is not one)."""
    from homeassistant.helpers.aiohttp_client import async_get_clientsession

    from devtools.media import make_clip

    session = async_get_clientsession(hass)
    headers = {"Authorization": f"Bearer {vllm.api_key}"}
    for path in ("/v1/sarai/status", "/v1/sarai/clip", "/props"):
        async with session.post(vllm.url.removesuffix("/v1") + path, headers=headers) as resp:
            assert resp.status == 404, path
    async with session.get(f"{vllm.url}/models") as resp:
        assert resp.status == 401

    def video(path: Any) -> dict[str, Any]:
        data = base64.b64encode(path.read_bytes()).decode()
        return {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{data}"}}

    silent = make_clip(clip_path.parent / "silent.mp4", seconds=1.0, audio=False)
    base = {"model": MODEL, "max_tokens": 8, "stream": True}
    bad = [
        {**base, "model": "qwen", "messages": [{"role": "user", "content": "hola"}]},
        {**base, "messages": [{"role": "user", "content": [video(clip_path), video(clip_path)]}]},
        {
            **base,
            "messages": [{"role": "user", "content": [video(silent)]}],
            "mm_processor_kwargs": {"use_audio_in_video": True},
        },
        {
            **base,
            "messages": [{"role": "user", "content": "hola"}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": {}}},
        },
        {**base, "messages": [{"role": "user", "content": [{"type": "clip", "frames": []}]}]},
        {
            **base,
            "messages": [
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "aGk=", "format": "wav"}}]}
            ],
        },
    ]
    for body in bad:
        async with session.post(f"{vllm.url}/chat/completions", json=body, headers=headers) as resp:
            assert resp.status in (400, 404), body
            assert "error" in await resp.json()
    assert len(vllm.rejected) == len(bad) and not vllm.requests


def test_encode_mp4_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    """The MP4 for a ``video_url``: odd sides are cropped even (yuv420p), MPEG-4 Part 2 where PyAV has no
    libx264, and frames that are not RGB pictures are a translated error."""
    import av
    import numpy as np

    from custom_components.sarai.engine.errors import InvalidInput
    from custom_components.sarai.engine.media import encode_mp4, prepare_clip_bytes

    frames = np.full((4, 57, 85, 3), 128, np.uint8)
    monkeypatch.setattr(av, "codecs_available", set(av.codecs_available) - {"libx264"})
    clip = prepare_clip_bytes(encode_mp4(frames, 2.0, np.zeros(8000, np.float32)), 2.0, True)
    assert clip.frames.shape[0] == 4 and clip.audio is not None
    with av.open(io.BytesIO(encode_mp4(frames, 2.0))) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height) == ("mpeg4", 84, 56)
        assert not container.streams.audio
    for bad in (np.zeros((0, 8, 8, 3), np.uint8), np.zeros((2, 8, 8), np.uint8), np.zeros((2, 1, 8, 3), np.uint8)):
        with pytest.raises(InvalidInput) as err:
            encode_mp4(bad, 2.0)
        assert err.value.translation_key == "video_invalid"
