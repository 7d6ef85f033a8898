"""Text-to-speech with Omni's talker (24 kHz), streamed sentence by sentence."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from homeassistant.components import tts
from homeassistant.components.tts.entity import TTSAudioRequest, TTSAudioResponse
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import ServiceValidationError
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from . import SaraiConfigEntry
from .const import CONF_VOICE, DEFAULT_VOICE, DOMAIN, LANGUAGES, LOGGER, TTS_MAX_CHARS, VOICES
from .engine.audio import SPEAK_RATE, wav_bytes, wav_stream_header
from .engine.errors import EngineError
from .engine.text import split_sentences
from .entity import SaraiEntity
from .errors import to_ha_error

PARALLEL_UPDATES = 0
SILENCE = bytes(SPEAK_RATE // 10 * 2)  # 0.1 s


async def async_setup_entry(
    hass: HomeAssistant, entry: SaraiConfigEntry, async_add_entities: AddConfigEntryEntitiesCallback
) -> None:
    """Add the TTS entity when the configured models can speak."""
    if entry.runtime_data.engine.can("speak"):
        async_add_entities([SaraiTextToSpeech(entry)])


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

    async def _speak(self, sentence: str, voice: str) -> bytes:
        try:
            return await self.engine.speak(sentence, voice)
        except EngineError as err:
            raise to_ha_error(err) from err

    async def async_get_tts_audio(self, message: str, language: str, options: dict[str, Any]) -> tts.TtsAudioType:
        """Whole message -> one WAV, spoken sentence by sentence (at most TTS_MAX_CHARS characters).

        A message with nothing to say (only spaces) is a short silence, not an error: an assistant's answer
        can be empty when it only ran a tool.
        """
        if len(message) > TTS_MAX_CHARS:
            raise ServiceValidationError(
                translation_domain=DOMAIN,
                translation_key="tts_too_long",
                translation_placeholders={"length": str(len(message)), "max_length": str(TTS_MAX_CHARS)},
            )
        sentences, _ = split_sentences(message, final=True)
        voice = self._voice(options)
        pcm = b"".join([await self._speak(sentence, voice) for sentence in sentences])
        return "wav", wav_bytes(pcm or SILENCE, SPEAK_RATE)

    async def async_stream_tts_audio(self, request: TTSAudioRequest) -> TTSAudioResponse:
        """Synthesize each sentence as soon as the text generator completes it.

        At most TTS_MAX_CHARS characters are spoken (the rest is dropped, with a warning); when the consumer
        stops reading, the generator is closed and the sentence being synthesised is cancelled.
        """
        voice = self._voice(request.options)

        async def sentences() -> AsyncGenerator[str]:
            buffer = ""
            async for text in request.message_gen:
                buffer += text
                done, buffer = split_sentences(buffer, final=False)
                for sentence in done:
                    yield sentence
            for sentence in split_sentences(buffer, final=True)[0]:
                yield sentence

        async def data_gen() -> AsyncGenerator[bytes]:
            spoken = 0
            header_sent = False
            async for sentence in sentences():
                if spoken + len(sentence) > TTS_MAX_CHARS:
                    LOGGER.warning("TTS: the text is longer than %d characters; the rest is not spoken", TTS_MAX_CHARS)
                    break
                spoken += len(sentence)
                pcm = await self._speak(sentence, voice)
                if not header_sent:  # only once the first sentence spoke: an error before it is a clean error
                    yield wav_stream_header()
                    header_sent = True
                yield pcm
            if not header_sent:
                yield wav_stream_header()
                yield SILENCE

        return TTSAudioResponse("wav", data_gen())
