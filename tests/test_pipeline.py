"""A full Assist pipeline run with SARAi as STT, agent and TTS; continue_conversation; multi-turn."""

from __future__ import annotations

from homeassistant.components import assist_pipeline, conversation
from homeassistant.components.assist_pipeline.pipeline import (
    PipelineEventType,
    async_get_pipeline,
    async_update_pipeline,
)
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.setup import async_setup_component
import pytest

from devtools.media import make_speech_wav
from tests.common import chunked, speech_metadata

pytestmark = pytest.mark.usefixtures("ha_core")

META = speech_metadata()


async def test_assist_pipeline_audio_to_tool_call_to_speech(
    hass: HomeAssistant, make_entry, omni_path: str, solar
) -> None:
    """Audio in -> SARAi STT -> SARAi agent (a tool call turns the kitchen on) -> SARAi TTS audio out."""
    assert await async_setup_component(hass, "intent", {})
    assert await async_setup_component(hass, "input_boolean", {"input_boolean": {"kitchen": {"name": "Kitchen"}}})
    async_expose_entity(hass, "conversation", "input_boolean.kitchen", True)
    assert await async_setup_component(hass, "assist_pipeline", {})
    solar.replies = [
        {"tool_call": ("intent__HassTurnOn", {"name": "Kitchen"})},
        {"text": "Listo. La luz de la cocina está encendida."},
    ]
    entry = make_entry({"omni_model": omni_path, "solar_url": solar.url}, {"routing_mode": "remote"})
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED

    pipeline = async_get_pipeline(hass)
    await async_update_pipeline(
        hass,
        pipeline,
        conversation_engine="conversation.sarai",
        conversation_language="es",
        language="es",
        stt_engine="stt.sarai_speech_to_text",
        stt_language="es",
        tts_engine="tts.sarai_text_to_speech",
        tts_language="es",
        tts_voice="Ethan",
    )
    events: list[assist_pipeline.PipelineEvent] = []
    await assist_pipeline.async_pipeline_from_audio_stream(
        hass,
        context=Context(),
        event_callback=events.append,
        stt_metadata=META,
        stt_stream=chunked(make_speech_wav(), 3200),
        pipeline_id=pipeline.id,
        tts_audio_output="wav",
    )
    kinds = [e.type for e in events]
    assert PipelineEventType.ERROR not in kinds, [e.data for e in events if e.type is PipelineEventType.ERROR]
    stt_end = next(e for e in events if e.type is PipelineEventType.STT_END)
    assert stt_end.data["stt_output"]["text"]
    assert hass.states.get("input_boolean.kitchen").state == "on"
    intent_end = next(e for e in events if e.type is PipelineEventType.INTENT_END)
    speech = intent_end.data["intent_output"]["response"]["speech"]["plain"]["speech"]
    assert "cocina" in speech
    tts_end = next(e for e in events if e.type is PipelineEventType.TTS_END)
    token = tts_end.data["tts_output"]["token"]
    assert token.endswith(".wav")
    # The TTS media really is WAV audio (the pipeline resamples SARAi's 24 kHz to what the satellite wants).
    from homeassistant.components.tts import async_get_stream

    stream = async_get_stream(hass, token)
    assert stream is not None
    audio = b"".join([chunk async for chunk in stream.async_stream_result()])
    assert audio[:4] == b"RIFF" and len(audio) > 1000
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_continue_conversation_and_history(hass: HomeAssistant, make_entry, solar) -> None:
    """A question from the model keeps the conversation open; the next turn sees the history."""
    solar.replies = [{"text": "¿Qué habitación quieres encender?"}, {"text": "Hecho."}]
    entry = make_entry({"solar_url": solar.url}, {"routing_mode": "remote", "llm_hass_api": []})
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    first = await conversation.async_converse(hass, "enciende la luz", None, Context(), agent_id="conversation.sarai")
    assert first.continue_conversation is True
    second = await conversation.async_converse(
        hass, "la cocina", first.conversation_id, Context(), agent_id="conversation.sarai"
    )
    assert second.continue_conversation is False
    roles = [m["role"] for m in solar.requests[-1]["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert solar.requests[-1]["messages"][2]["content"].startswith("¿Qué habitación")
    assert await hass.config_entries.async_unload(entry.entry_id)
