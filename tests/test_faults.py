"""The fault catalogue: each fault gets a clear error or a documented degradation, nothing is lost, and the
next request works. (Further cases live beside their feature: test_solar.py, test_vision.py, test_engine.py.)"""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

from aiohttp import web
from homeassistant.components import conversation, stt
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import EVENT_HOMEASSISTANT_STOP
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import intent, issue_registry as ir
import numpy as np
import pytest

from custom_components.sarai.const import DOMAIN
from custom_components.sarai.engine import EngineConfig, SaraiEngine
from custom_components.sarai.engine.errors import InvalidInput, MediaUnavailable
from custom_components.sarai.engine.media import prepare_clip
from custom_components.sarai.engine.omni_backend import load_image
from tests.common import chunked, local_server, setup_entry as _setup, speech_metadata, tone_wav

pytestmark = pytest.mark.usefixtures("ha_core")


async def _ask(hass: HomeAssistant, text: str = "hola") -> conversation.ConversationResult:
    return await conversation.async_converse(hass, text, None, Context(), agent_id="conversation.sarai")


def _meta(rate: int = 16000) -> stt.SpeechMetadata:
    return speech_metadata(rate)


async def test_corrupt_gguf_at_setup(hass: HomeAssistant, make_entry, tmp_path: Path, gguf_path: str) -> None:
    """A truncated GGUF fails setup with a translated reason and a repair issue."""
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(Path(gguf_path).read_bytes()[:40])
    entry = make_entry({"gguf_model": str(bad)})
    entry.add_to_hass(hass)
    assert not await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_ERROR
    assert entry.reason
    assert ir.async_get(hass).async_get_issue(DOMAIN, "model_unusable") is not None


async def test_gguf_corrupted_after_setup_then_fixed(
    hass: HomeAssistant, make_entry, tmp_path: Path, gguf_path: str
) -> None:
    """The file breaks between setup and first use: a translated error; fixed, the next turn works."""
    path = tmp_path / "model.gguf"
    good = Path(gguf_path).read_bytes()
    path.write_bytes(good)
    entry = make_entry({"gguf_model": str(path)}, {"llm_hass_api": []})
    await _setup(hass, entry)
    path.write_bytes(b"GGUF" + b"\0" * 64)
    result = await _ask(hass)
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert result.response.speech["plain"]["speech"]
    path.write_bytes(good)
    result = await _ask(hass)
    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_omni_without_voices_at_setup(hass: HomeAssistant, make_entry, tmp_path: Path, omni_path: str) -> None:
    """An Omni directory without spk_dict.pt is refused at setup, saying what is missing."""
    import shutil

    broken = tmp_path / "omni"
    shutil.copytree(omni_path, broken)
    (broken / "spk_dict.pt").unlink()
    entry = make_entry({"omni_model": str(broken)})
    entry.add_to_hass(hass)
    assert not await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_ERROR


async def test_budget_too_small_repair_and_remote_answers(hass: HomeAssistant, make_entry, solar) -> None:
    """A budget that holds no model: a repair issue, local turns say why, SOLAR still answers."""
    entry = make_entry({"memory_budget_mb": 1, "solar_url": solar.url}, {"routing_mode": "local", "llm_hass_api": []})
    await _setup(hass, entry)
    assert ir.async_get(hass).async_get_issue(DOMAIN, "budget_too_small") is not None
    result = await _ask(hass)
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert "MB" in result.response.speech["plain"]["speech"]
    assert (await hass.config_entries.async_remove(entry.entry_id))["require_restart"] is False
    entry2 = make_entry({"memory_budget_mb": 1, "solar_url": solar.url}, {"routing_mode": "auto", "llm_hass_api": []})
    await _setup(hass, entry2)
    solar.replies = [{"text": "desde SOLAR"}]
    result = await _ask(hass)
    assert result.response.speech["plain"]["speech"].strip() == "desde SOLAR"
    assert entry2.runtime_data.engine.last_route.fallback.startswith("local failed")
    assert await hass.config_entries.async_unload(entry2.entry_id)


async def test_prompt_longer_than_context(hass: HomeAssistant, make_entry, solar) -> None:
    """Assist's prompt does not fit a 512-token context: a clear error locally, SOLAR answers in auto mode."""
    entry = make_entry(options={"context_size": 512})
    await _setup(hass, entry)
    result = await _ask(hass)
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert "512" in result.response.speech["plain"]["speech"]
    assert (await hass.config_entries.async_remove(entry.entry_id))["require_restart"] is False
    entry2 = make_entry({"solar_url": solar.url}, {"context_size": 512, "routing_mode": "auto"})
    await _setup(hass, entry2)
    solar.replies = [{"text": "respuesta larga"}]
    result = await _ask(hass)
    assert result.response.speech["plain"]["speech"].strip() == "respuesta larga"
    assert "context" in entry2.runtime_data.engine.last_route.fallback
    assert await hass.config_entries.async_unload(entry2.entry_id)


async def test_fifty_concurrent_conversations(hass: HomeAssistant, make_entry) -> None:
    """50 turns at once: all answered, one model load, nothing lost."""
    entry = make_entry(options={"llm_hass_api": [], "max_tokens": 24})
    await _setup(hass, entry)
    results = await asyncio.gather(*(_ask(hass, f"hola {i}") for i in range(50)))
    assert all(r.response.response_type is intent.IntentResponseType.ACTION_DONE for r in results)
    assert len({r.conversation_id for r in results}) == 50
    assert entry.runtime_data.engine.manager.backend("text").loads == 1
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_unload_during_generation(hass: HomeAssistant, make_entry) -> None:
    """Unloading the entry while a turn is generating ends the turn cleanly and frees the model."""
    entry = make_entry(options={"llm_hass_api": [], "max_tokens": 1500})
    await _setup(hass, entry)
    engine = entry.runtime_data.engine
    turn = asyncio.create_task(_ask(hass, "cuéntame una historia larga"))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if engine.status().state == "busy":
            break
    assert await hass.config_entries.async_unload(entry.entry_id)
    result = await asyncio.wait_for(turn, 30)
    assert result.response.response_type in (intent.IntentResponseType.ACTION_DONE, intent.IntentResponseType.ERROR)
    assert not engine.manager.backend("text").loaded


async def test_stop_during_model_load(hass: HomeAssistant, make_entry, omni_path: str) -> None:
    """Home Assistant stopping while a model loads: the load finishes, then everything is released."""
    entry = make_entry({"omni_model": omni_path}, {"llm_hass_api": []})
    await _setup(hass, entry)
    engine = entry.runtime_data.engine
    warm = asyncio.create_task(engine.manager.warmup(["omni"]))
    await asyncio.sleep(0)
    hass.bus.async_fire(EVENT_HOMEASSISTANT_STOP)
    await hass.async_block_till_done()
    await warm
    await engine.close()
    assert not engine.manager.backend("omni").loaded
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_options_changed_while_loaded_and_model_switched_during_a_turn(
    hass: HomeAssistant, make_entry, models_dir: Path
) -> None:
    """Options change with a model resident: reload, old model released. 7B->3B switch mid-turn: clean."""
    entry = make_entry(options={"llm_hass_api": [], "max_tokens": 2000})
    await _setup(hass, entry)
    old = entry.runtime_data.engine
    await _ask(hass)
    assert old.manager.backend("text").loaded
    hass.config_entries.async_update_entry(entry, options={**entry.options, "temperature": 0.3})
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert entry.runtime_data.engine is not old and not old.manager.backend("text").loaded
    # The "downgrade is changing a file": swap the GGUF while a turn runs.
    turn = asyncio.create_task(_ask(hass, "cuéntame algo"))
    await asyncio.sleep(0.05)
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, "gguf_model": str(models_dir / "tiny-qwen2.gguf")}
    )
    await hass.async_block_till_done()
    result = await asyncio.wait_for(turn, 60)
    assert result.response.response_type in (intent.IntentResponseType.ACTION_DONE, intent.IntentResponseType.ERROR)
    assert entry.runtime_data.engine.text.info.architecture == "qwen2"
    result = await _ask(hass)
    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_stt_rates_and_lengths(hass: HomeAssistant, make_entry, mmproj_path: str, caplog) -> None:
    """8 kHz WAV is converted; raw PCM works; 70 s of audio is cut at the guard with a log line."""
    entry = make_entry({"mmproj_model": mmproj_path})
    await _setup(hass, entry)
    entity = stt.async_get_speech_to_text_entity(hass, "stt.sarai_speech_to_text")
    assert (await entity.async_process_audio_stream(_meta(), chunked(tone_wav(1, 8000), 32000))).result is (
        stt.SpeechResultState.SUCCESS
    )
    raw = tone_wav(1, 16000)[44:]
    assert (
        await entity.async_process_audio_stream(_meta(), chunked(raw, 32000))
    ).result is stt.SpeechResultState.SUCCESS
    with caplog.at_level(logging.WARNING):
        long = await entity.async_process_audio_stream(_meta(), chunked(tone_wav(70, 16000), 32000))
    assert long.result is stt.SpeechResultState.SUCCESS
    assert "longer than" in caplog.text
    odd = await entity.async_process_audio_stream(_meta(), chunked(b"\x01", 32000))
    assert odd.result is stt.SpeechResultState.ERROR
    assert await hass.config_entries.async_unload(entry.entry_id)


def test_decompression_bomb_and_non_images() -> None:
    """A PNG of 64 megapixels (tiny on disk), a text file and empty bytes: InvalidInput, nothing decoded."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 200_000
    for data in (buf.getvalue(), b"hello world", b""):
        with pytest.raises(InvalidInput):
            load_image(data)


async def test_stream_that_never_answers(socket_enabled) -> None:
    """A camera URL that accepts the connection and never sends a byte: an error after the timeout."""

    done = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        await done.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/stream.mp4", hang)
    async with local_server(app, release=done) as url:
        with pytest.raises((MediaUnavailable, InvalidInput)):
            await asyncio.to_thread(prepare_clip, f"{url}/stream.mp4", 2.0, 2.0, True, 448 * 448, 1.0)


def test_clip_requests_out_of_range(clip_path: Path) -> None:
    """Zero or too long durations and silly rates are refused before opening anything."""
    for duration, fps in ((0, 2), (31, 2), (5, 0), (5, 100)):
        with pytest.raises(InvalidInput):
            prepare_clip(str(clip_path), duration, fps)


async def test_unsupported_codec_clip(tmp_path: Path) -> None:
    """An audio-only file (no video stream) is a clear error."""
    import av

    path = tmp_path / "audio.m4a"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(InvalidInput, match="no video"):
        await asyncio.to_thread(prepare_clip, str(path))


async def test_secret_never_logged(hass: HomeAssistant, make_entry, solar, caplog) -> None:
    """The SOLAR key appears in no log line, no event and no error, even when the server rejects it."""
    events = []
    hass.bus.async_listen("sarai_route", events.append)
    solar.api_key = "right-key"
    entry = make_entry(
        {"solar_url": solar.url, "solar_api_key": "super-secret-key"}, {"routing_mode": "remote", "llm_hass_api": []}
    )
    with caplog.at_level(logging.DEBUG):
        await _setup(hass, entry)
        result = await _ask(hass)
        await hass.async_block_till_done()
    assert "super-secret-key" not in caplog.text
    assert "super-secret-key" not in str([e.data for e in events])
    assert "super-secret-key" not in str(result.as_dict())
    assert await hass.config_entries.async_unload(entry.entry_id)


def test_engine_opens_models_read_only(gguf_path: str) -> None:
    """Validation reads headers only and never writes to the model files."""
    import os

    before = os.stat(gguf_path).st_mtime_ns
    SaraiEngine(EngineConfig(gguf_model=gguf_path))
    assert os.stat(gguf_path).st_mtime_ns == before
