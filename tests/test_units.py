"""Small pieces on their own: event validation, media helpers, audio, model headers, tool parsing, SOLAR parsing,
and the platform paths the end-to-end tests do not reach (idle unload timer, TTS errors, video attachments)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
import io
import json
from pathlib import Path
import struct
import wave

from homeassistant.components import ai_task, tts
from homeassistant.components.conversation import Attachment
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.util import dt as dt_util
import numpy as np
import pytest
from pytest_homeassistant_custom_component.common import async_fire_time_changed

from custom_components.sarai.diagnostics import _version
from custom_components.sarai.engine import audio
from custom_components.sarai.engine.errors import InvalidInput, ModelCorrupt, ModelMissing, RemoteProtocolError
from custom_components.sarai.engine.events import event_schema, parse_events
from custom_components.sarai.engine.media import prepare_clip, target_size
from custom_components.sarai.engine.models import GGUFInfo, inspect_mmproj, inspect_omni, read_gguf_metadata
from custom_components.sarai.engine.solar import SolarClient
from custom_components.sarai.engine.tools import parse_tool_call
from devtools.media import naive_prepare

pytestmark = pytest.mark.usefixtures("ha_core")
LABELS = ["person", "dog barking"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("no json here", "no JSON"),
        ("{bad json}", "invalid JSON"),
        ('{"x": 1}', "no events list"),
        ('{"events": [1]}', "not an object"),
        ('{"events": [{"label": "ufo"}]}', "was not asked"),
        ('{"events": [{"label": "person", "confidence": "x", "start_s": 0, "end_s": 1}]}', "lacks a number"),
        ('{"events": [{"label": "person", "confidence": 1.5, "start_s": 0, "end_s": 1}]}', "outside 0..1"),
        ('{"events": [{"label": "person", "confidence": 0.5, "start_s": 3, "end_s": 1}]}', "outside the"),
        ('{"events": [{"label": "person", "confidence": 0.5, "start_s": 0, "end_s": 99}]}', "outside the"),
    ],
)
def test_parse_events_rejects(text: str, error: str) -> None:
    """Every way a model's event JSON can be wrong is a ValueError saying what."""
    with pytest.raises(ValueError, match=error):
        parse_events(text, LABELS, 6.0)


def test_parse_events_accepts_and_normalises() -> None:
    """Labels match case-insensitively; end times are clipped to the clip; descriptions are bounded."""
    event = {"label": "Dog Barking", "confidence": 0.91234, "start_s": 1, "end_s": 6.3, "description": "guau"}
    text = "Here: " + json.dumps({"events": [event]})
    assert parse_events(text, LABELS, 6.0) == [
        {"label": "dog barking", "confidence": 0.912, "start_s": 1.0, "end_s": 6.0, "description": "guau"}
    ]
    assert event_schema(LABELS)["properties"]["events"]["items"]["properties"]["label"]["enum"] == LABELS


def test_media_helpers(clip_path: Path) -> None:
    """Sizes snap to the 28 px patch; the naive reference decodes everything; a clip shorter than asked is fine."""
    assert target_size(1280, 720, 448 * 448) == (588, 336)
    assert target_size(20, 20, 448 * 448) == (28, 28)
    frames, sound = naive_prepare(str(clip_path), fps=2)
    assert frames.shape[0] >= 10 and sound.size > 0
    clip = prepare_clip(str(clip_path), duration_s=30, fps=1, with_audio=False)
    assert clip.audio is None and clip.summary()["frames"] == 5
    with pytest.raises(InvalidInput):
        prepare_clip(str(clip_path.parent / "nope.mp4"))


def test_audio_helpers() -> None:
    """Stereo PCM is mixed down, odd bytes are dropped, 8-bit WAV and non-WAV are refused, resampling works."""
    stereo = struct.pack("<4h", 1000, 3000, -1000, -3000) + b"\x01"
    assert np.allclose(audio.pcm16_to_float(stereo, 2), [2000 / 32768, -2000 / 32768])
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(b"\x80" * 800)
    with pytest.raises(InvalidInput):
        audio.decode_wav(buf.getvalue())
    with pytest.raises(InvalidInput):
        audio.decode_wav(b"RIFF....WAVEjunk")
    assert audio.resample(np.ones(8000, np.float32), 8000, 16000).size == 16000
    assert len(audio.chunks_30s(np.zeros(16000 * 65, np.float32))) == 3


def test_model_header_errors(tmp_path: Path, gguf_path: str, omni_path: str, mmproj_path: str) -> None:
    """Truncated headers, absurd strings, unknown types, unreadable files and odd checkpoints are typed errors."""
    assert GGUFInfo("x", "qwen2", 1, None, None, None, None, None, None).kv_cache_bytes(1024) == 0
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    (tmp_path / "longstr.gguf").write_bytes(head + struct.pack("<Q", 1 << 40))
    (tmp_path / "badtype.gguf").write_bytes(head + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 99))
    (tmp_path / "v9.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0))
    for name in ("longstr.gguf", "badtype.gguf", "v9.gguf"):
        with pytest.raises(ModelCorrupt):
            read_gguf_metadata(tmp_path / name)
    locked = tmp_path / "locked.gguf"
    locked.mkdir()
    with pytest.raises(ModelMissing):
        read_gguf_metadata(tmp_path / "missing.gguf")
    with pytest.raises(ModelCorrupt):
        inspect_mmproj(gguf_path)
    info = inspect_mmproj(mmproj_path)
    assert info.has_audio and info.has_vision and info.projector == "qwen2.5o"
    import shutil

    odd = tmp_path / "omni"
    shutil.copytree(omni_path, odd)
    for f in odd.glob("*.safetensors"):
        f.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(ModelCorrupt):
        inspect_omni(odd)
    for f in odd.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelMissing):
        inspect_omni(odd)
    (odd / "config.json").write_text("{not json")
    with pytest.raises(ModelCorrupt):
        inspect_omni(odd)


def test_tool_call_parser_tolerates_garbage() -> None:
    """Broken JSON, a missing name, string or odd arguments: parsed as far as is safe."""
    assert parse_tool_call('{"name": 1}') is None
    assert parse_tool_call("{not json") is None
    call = parse_tool_call('{"name": "HassTurnOn", "arguments": "{bad"}')
    assert call is not None and call.arguments == {}
    call = parse_tool_call('{"name": "HassTurnOn", "arguments": [1, 2]}')
    assert call is not None and call.arguments == {}
    call = parse_tool_call('{"name": "HassTurnOn", "arguments": "{\\"name\\": \\"Cocina\\"}"}')
    assert call is not None and call.arguments == {"name": "Cocina"}


def test_solar_chunk_parsing() -> None:
    """A non-object chunk and tool arguments that are not JSON are protocol errors; odd chunks have no finish."""
    with pytest.raises(RemoteProtocolError):
        SolarClient._parse_chunk("[1, 2]", {})
    with pytest.raises(RemoteProtocolError):
        SolarClient._tool_call({"id": None, "name": "x", "arguments": "{oops"})
    assert SolarClient._finish_reason("[]") is False
    assert SolarClient._tool_call({"id": None, "name": "x", "arguments": ""}).id.startswith("call_")


async def test_solar_models_not_openai(hass: HomeAssistant, solar) -> None:
    """/v1/models answering JSON without data is 'not OpenAI-compatible'."""
    from homeassistant.helpers.aiohttp_client import async_get_clientsession

    solar.models_status = 200
    client = SolarClient(async_get_clientsession(hass), solar.url.replace("/v1", "/v2"))
    with pytest.raises(Exception):  # noqa: B017 - any RemoteError subclass: 404 here
        await client.list_models()


def test_diagnostics_version_of_missing_package() -> None:
    """A package that is not installed shows as None."""
    assert _version("no-such-package-sarai") is None


async def test_idle_unload_timer(hass: HomeAssistant, make_entry) -> None:
    """With idle_unload_minutes, a model unused for that long is released by the timer."""
    entry = make_entry(options={"llm_hass_api": [], "idle_unload_minutes": 1})
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    engine = entry.runtime_data.engine
    await engine.warmup()
    assert engine.text.loaded
    engine.text.last_used = 0.0  # long ago
    for minutes in (2, 4, 6):
        async_fire_time_changed(hass, dt_util.utcnow() + timedelta(minutes=minutes))
        await hass.async_block_till_done()
        for _ in range(20):
            if not engine.text.loaded:
                break
            await asyncio.sleep(0.05)
    assert not engine.text.loaded
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_tts_errors_are_translated(hass: HomeAssistant, make_entry, omni_path: str) -> None:
    """Speech that cannot be produced (budget too small for Omni) is a translated error, whole or streamed."""
    entry = make_entry({"omni_model": omni_path, "memory_budget_mb": 1})
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    entity = hass.data[tts.DATA_COMPONENT].get_entity("tts.sarai_text_to_speech")
    with pytest.raises(HomeAssistantError) as err:
        await entity.async_get_tts_audio("Hola.", "es", {})
    assert err.value.translation_key == "insufficient_memory"

    async def gen():
        yield "Hola. "

    response = await entity.async_stream_tts_audio(tts.TTSAudioRequest("es", {}, gen()))
    with pytest.raises(HomeAssistantError):
        async for _chunk in response.data_gen:
            pass
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_ai_task_video_attachment_and_size_guard(
    hass: HomeAssistant, make_entry, omni_path: str, clip_path: Path, tmp_path: Path
) -> None:
    """A clip attachment goes through the video pipeline; an image over 20 MB is refused."""
    entry = make_entry({"omni_model": omni_path}, {"llm_hass_api": []})
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    entity = hass.data[ai_task.DATA_COMPONENT].get_entity("ai_task.sarai_ai_task")
    task = ai_task.GenDataTask(
        name="t", instructions="¿Qué pasa?", attachments=[Attachment("media-source://x", "video/mp4", clip_path)]
    )
    descriptions = await entity._describe_attachments(task)
    assert len(descriptions) == 1
    big = tmp_path / "big.jpg"
    with big.open("wb") as fh:
        fh.truncate(21 * 1024 * 1024)
    task = ai_task.GenDataTask(
        name="t", instructions="x", attachments=[Attachment("media-source://y", "image/jpeg", big)]
    )
    with pytest.raises(HomeAssistantError) as err:
        await entity._describe_attachments(task)
    assert err.value.translation_key == "attachment_too_large"
    assert json.dumps(descriptions)
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_conversation_languages_and_unknown_llm_api(hass: HomeAssistant, make_entry) -> None:
    """The agent takes any language; an LLM API that no longer exists is an error result, not a traceback."""
    from homeassistant.components import conversation
    from homeassistant.core import Context
    from homeassistant.helpers import intent

    entry = make_entry(options={"llm_hass_api": ["gone_api"]})
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    agent = conversation.async_get_agent(hass, "conversation.sarai")
    assert agent.supported_languages == "*"
    result = await conversation.async_converse(hass, "hola", None, Context(), agent_id="conversation.sarai")
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert await hass.config_entries.async_unload(entry.entry_id)
