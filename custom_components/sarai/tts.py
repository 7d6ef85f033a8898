"""Text-to-speech with Omni's talker (24 kHz), streamed sentence by sentence."""

from __future__ import annotations

from collections.abc import AsyncGenerator
import re
from typing import Any

from homeassistant.components import tts
from homeassistant.components.tts.entity import TTSAudioRequest, TTSAudioResponse
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from . import SaraiConfigEntry
from .const import CONF_VOICE, DEFAULT_VOICE, LANGUAGES, VOICES
from .engine.audio import SPEAK_RATE, wav_bytes
from .engine.errors import EngineError
from .entity import SaraiEntity
from .errors import to_ha_error

PARALLEL_UPDATES = 0
SENTENCE_END = re.compile(r"(?<=[.!?¡¿;:\n])\s+")


async def async_setup_entry(
    hass: HomeAssistant, entry: SaraiConfigEntry, async_add_entities: AddConfigEntryEntitiesCallback
) -> None:
    """Add the TTS entity when the configured models can speak."""
    if entry.runtime_data.engine.can("speak"):
        async_add_entities([SaraiTextToSpeech(entry)])


def split_sentences(buffer: str, final: bool) -> tuple[list[str], str]:
    """Complete sentences in ``buffer`` and the remainder."""
    parts = SENTENCE_END.split(buffer)
    if final:
        return [p.strip() for p in parts if p.strip()], ""
    return [p.strip() for p in parts[:-1] if p.strip()], parts[-1]


class SaraiTextToSpeech(tts.TextToSpeechEntity, SaraiEntity):
    """SARAi text-to-speech."""

    _attr_translation_key = "tts"
    _attr_supported_options = [tts.ATTR_VOICE]

    def __init__(self, entry: SaraiConfigEntry) -> None:
        """Create the entity."""
        SaraiEntity.__init__(self, entry, "tts")
        self._attr_default_language = "es"
        self._attr_default_options = {tts.ATTR_VOICE: entry.options.get(CONF_VOICE, DEFAULT_VOICE)}

    @property
    def supported_languages(self) -> list[str]:
        """Languages the talker speaks."""
        return LANGUAGES

    def async_get_supported_voices(self, language: str) -> list[tts.Voice]:
        """Chelsie and Ethan."""
        return [tts.Voice(voice, voice) for voice in VOICES]

    def _voice(self, options: dict[str, Any]) -> str:
        voice = options.get(tts.ATTR_VOICE) or DEFAULT_VOICE
        return voice if voice in VOICES else DEFAULT_VOICE

    async def async_get_tts_audio(self, message: str, language: str, options: dict[str, Any]) -> tts.TtsAudioType:
        """Whole message -> one WAV."""
        try:
            pcm = await self.engine.speak(message, self._voice(options))
        except EngineError as err:
            raise to_ha_error(err) from err
        return "wav", wav_bytes(pcm, SPEAK_RATE)

    async def async_stream_tts_audio(self, request: TTSAudioRequest) -> TTSAudioResponse:
        """Synthesize each sentence as soon as the text generator completes it."""
        voice = self._voice(request.options)

        async def data_gen() -> AsyncGenerator[bytes]:
            buffer = ""
            header_sent = False

            async def speak(sentences: list[str]) -> AsyncGenerator[bytes]:
                nonlocal header_sent
                for sentence in sentences:
                    try:
                        pcm = await self.engine.speak(sentence, voice)
                    except EngineError as err:
                        raise to_ha_error(err) from err
                    if not header_sent:
                        # A WAV header with an open length; PCM follows sentence by sentence.
                        header = bytearray(wav_bytes(b"", SPEAK_RATE))
                        header[4:8] = (0xFFFFFFFF).to_bytes(4, "little")
                        header[40:44] = (0xFFFFFFFF - 36).to_bytes(4, "little")
                        yield bytes(header)
                        header_sent = True
                    yield pcm

            async for text in request.message_gen:
                buffer += text
                sentences, buffer = split_sentences(buffer, final=False)
                async for chunk in speak(sentences):
                    yield chunk
            sentences, _ = split_sentences(buffer, final=True)
            async for chunk in speak(sentences):
                yield chunk

        return TTSAudioResponse("wav", data_gen())
