"""The integration end to end: setup/unload, conversation (local and SOLAR, tools), STT, TTS, sensors, diagnostics."""

from __future__ import annotations

import io
from pathlib import Path
import wave

from homeassistant.components import conversation, stt, tts
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.helpers import intent, issue_registry as ir
from homeassistant.setup import async_setup_component
import pytest

from custom_components.sarai.const import DOMAIN
from tests.common import chunked, setup_entry as _setup, speech_metadata, tone_wav

pytestmark = pytest.mark.usefixtures("ha_core")
from custom_components.sarai.diagnostics import async_get_config_entry_diagnostics


async def test_setup_unload_local_conversation(hass: HomeAssistant, make_entry) -> None:
    """The agent answers locally on the tiny GGUF; sensors report the route; unload releases the model."""
    entry = make_entry(options={"llm_hass_api": []})
    await _setup(hass, entry)
    agent_id = "conversation.sarai"
    assert hass.states.get(agent_id) is not None
    result = await conversation.async_converse(hass, "hola", None, hass_context(), agent_id=agent_id)
    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE, result.response.speech
    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
    await hass.async_block_till_done()
    assert hass.states.get("sensor.sarai_last_route").state == "local"
    assert hass.states.get("sensor.sarai_engine_state").state == "ready"
    # Only a GGUF: no STT/TTS entities.
    assert hass.states.get("stt.sarai_speech_to_text") is None
    engine = entry.runtime_data.engine
    assert await hass.config_entries.async_unload(entry.entry_id)
    assert not engine.manager.backend("text").loaded


def hass_context():
    from homeassistant.core import Context

    return Context()


async def test_missing_model_after_setup_is_config_entry_error(
    hass: HomeAssistant, make_entry, tmp_path: Path, gguf_path: str
) -> None:
    """A model file that disappeared fails setup with a repair issue, never a traceback."""
    path = tmp_path / "gone.gguf"
    path.write_bytes(Path(gguf_path).read_bytes())
    entry = make_entry({"gguf_model": str(path)})
    path.unlink()
    entry.add_to_hass(hass)
    assert not await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_ERROR
    assert ir.async_get(hass).async_get_issue(DOMAIN, "model_unusable") is not None


async def test_remote_tool_call_changes_entity(hass: HomeAssistant, make_entry, solar) -> None:
    """SOLAR asks for HassTurnOn; Home Assistant executes it; the model answers with the result."""
    assert await async_setup_component(hass, "homeassistant", {})
    assert await async_setup_component(hass, "intent", {})
    assert await async_setup_component(hass, "input_boolean", {"input_boolean": {"kitchen": {"name": "Kitchen"}}})
    async_expose_entity(hass, "conversation", "input_boolean.kitchen", True)
    solar.replies = [{"tool_call": ("intent__HassTurnOn", {"name": "Kitchen"})}, {"text": "Listo, cocina encendida."}]
    entry = make_entry({"solar_url": solar.url}, {"routing_mode": "remote", "llm_hass_api": ["assist"]})
    await _setup(hass, entry)
    assert hass.states.get("input_boolean.kitchen").state == "off"
    result = await conversation.async_converse(
        hass, "enciende la cocina", None, hass_context(), agent_id="conversation.sarai"
    )
    assert hass.states.get("input_boolean.kitchen").state == "on"
    assert "Listo" in result.response.speech["plain"]["speech"]
    assert solar.requests[0]["tools"]
    assert solar.requests[1]["messages"][-1]["role"] == "tool"
    await hass.async_block_till_done()
    assert hass.states.get("sensor.sarai_last_route").state == "remote"
    diag = await async_get_config_entry_diagnostics(hass, entry)
    assert diag["router"]["last_route"]["route"] == "remote"
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_remote_down_falls_back_local_and_key_rejected_starts_reauth(
    hass: HomeAssistant, make_entry, solar
) -> None:
    """500 -> local answer; 401 -> local answer and a reauth flow; the key never shows in diagnostics."""
    solar.replies = [{"status": 500}]
    entry = make_entry(
        {"solar_url": solar.url, "solar_api_key": "secret-key"}, {"routing_mode": "remote", "llm_hass_api": []}
    )
    await _setup(hass, entry)
    result = await conversation.async_converse(hass, "hola", None, hass_context(), agent_id="conversation.sarai")
    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
    assert entry.runtime_data.engine.last_route.fallback.startswith("remote failed")
    solar.api_key = "other"
    await conversation.async_converse(hass, "hola", None, hass_context(), agent_id="conversation.sarai")
    await hass.async_block_till_done()
    flows = hass.config_entries.flow.async_progress_by_handler(DOMAIN)
    assert any(f["context"]["source"] == "reauth" for f in flows)
    diag = await async_get_config_entry_diagnostics(hass, entry)
    assert "secret-key" not in str(diag)
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_stt_and_tts(hass: HomeAssistant, make_entry, omni_path: str) -> None:
    """STT hears a WAV; TTS speaks 24 kHz WAV, whole and streamed sentence by sentence."""
    entry = make_entry({"omni_model": omni_path})
    await _setup(hass, entry)
    engine_stt = stt.async_get_speech_to_text_entity(hass, "stt.sarai_speech_to_text")
    assert engine_stt is not None
    meta = speech_metadata()

    result = await engine_stt.async_process_audio_stream(meta, chunked(tone_wav()))
    assert result.result is stt.SpeechResultState.SUCCESS
    empty = await engine_stt.async_process_audio_stream(meta, chunked(b""))
    assert empty.result is stt.SpeechResultState.ERROR
    bad = stt.SpeechMetadata(
        language="es",
        format=stt.AudioFormats.OGG,
        codec=stt.AudioCodecs.OPUS,
        bit_rate=stt.AudioBitRates.BITRATE_16,
        sample_rate=stt.AudioSampleRates.SAMPLERATE_16000,
        channel=stt.AudioChannels.CHANNEL_MONO,
    )
    assert (await engine_stt.async_process_audio_stream(bad, chunked(tone_wav()))).result is stt.SpeechResultState.ERROR

    entity = hass.data[tts.DATA_COMPONENT].get_entity("tts.sarai_text_to_speech")
    assert [v.voice_id for v in entity.async_get_supported_voices("es")] == ["Chelsie", "Ethan"]
    ext, data = await entity.async_get_tts_audio("Hola.", "es", {"voice": "Ethan"})
    assert ext == "wav"
    with wave.open(io.BytesIO(data)) as w:
        assert w.getframerate() == 24000 and w.getnchannels() == 1 and w.getnframes() > 0

    produced: list[str] = []

    async def message_gen():
        for piece in ["Hola. ", "Soy SARAi", ". Adiós."]:
            produced.append(piece)
            yield piece

    response = await entity.async_stream_tts_audio(tts.TTSAudioRequest("es", {}, message_gen()))
    chunks = [c async for c in response.data_gen]
    assert chunks[0][:4] == b"RIFF"
    assert len(chunks) == 4  # header + one chunk per sentence
    assert await hass.config_entries.async_unload(entry.entry_id)
