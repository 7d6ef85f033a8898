"""Speech-to-text: Qwen2.5-Omni hears 16-bit PCM or WAV, mono or stereo, at any rate Home Assistant names
(resampled to 16 kHz mono; created only when the engine can hear)."""

from __future__ import annotations

from collections.abc import AsyncIterable

from homeassistant.components import stt
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from . import SaraiConfigEntry
from .const import LANGUAGES, LOGGER, STT_MAX_SECONDS
from .engine.audio import HEAR_RATE, decode_wav, pcm16_to_float
from .engine.errors import EngineError
from .entity import SaraiEntity

PARALLEL_UPDATES = 0
MAX_BYTES = STT_MAX_SECONDS * HEAR_RATE * 2


async def async_setup_entry(
    hass: HomeAssistant, entry: SaraiConfigEntry, async_add_entities: AddConfigEntryEntitiesCallback
) -> None:
    """Add the STT entity when the configured models can hear."""
    if entry.runtime_data.engine.can("hear"):
        async_add_entities([SaraiSpeechToText(entry)])


class SaraiSpeechToText(stt.SpeechToTextEntity, SaraiEntity):
    """SARAi speech-to-text."""

    _attr_translation_key = "stt"

    def __init__(self, entry: SaraiConfigEntry) -> None:
        """Create the entity."""
        SaraiEntity.__init__(self, entry, "stt")

    @property
    def supported_languages(self) -> list[str]:
        """Languages Omni hears."""
        return LANGUAGES

    @property
    def supported_formats(self) -> list[stt.AudioFormats]:
        """WAV and raw PCM."""
        return [stt.AudioFormats.WAV]

    @property
    def supported_codecs(self) -> list[stt.AudioCodecs]:
        """16-bit PCM."""
        return [stt.AudioCodecs.PCM]

    @property
    def supported_bit_rates(self) -> list[stt.AudioBitRates]:
        """16 bit."""
        return [stt.AudioBitRates.BITRATE_16]

    @property
    def supported_sample_rates(self) -> list[stt.AudioSampleRates]:
        """Every rate Home Assistant names: audio is resampled to the 16 kHz the models hear."""
        return list(stt.AudioSampleRates)

    @property
    def supported_channels(self) -> list[stt.AudioChannels]:
        """Mono, or stereo mixed down to mono."""
        return [stt.AudioChannels.CHANNEL_MONO, stt.AudioChannels.CHANNEL_STEREO]

    async def async_process_audio_stream(
        self, metadata: stt.SpeechMetadata, stream: AsyncIterable[bytes]
    ) -> stt.SpeechResult:
        """Collect the stream (bounded) and transcribe it."""
        error = stt.SpeechResult(None, stt.SpeechResultState.ERROR)
        if metadata.codec != stt.AudioCodecs.PCM or metadata.bit_rate != stt.AudioBitRates.BITRATE_16:
            LOGGER.warning("STT: unsupported audio %s/%s (need 16-bit PCM)", metadata.codec, metadata.bit_rate)
            return error
        audio = bytearray()
        max_bytes = max(MAX_BYTES, STT_MAX_SECONDS * int(metadata.sample_rate) * int(metadata.channel) * 2)
        async for chunk in stream:
            audio += chunk
            if len(audio) > max_bytes:
                LOGGER.warning("STT: audio longer than %d s, stopped listening", STT_MAX_SECONDS)
                break
        data = bytes(audio)
        try:
            if data[:4] == b"RIFF":
                samples, rate = decode_wav(data)
            else:
                samples, rate = pcm16_to_float(data, int(metadata.channel)), int(metadata.sample_rate)
            text = await self.engine.transcribe(samples, rate, metadata.language)
        except EngineError as err:
            LOGGER.warning("STT failed: %s", err)
            return error
        return stt.SpeechResult(text, stt.SpeechResultState.SUCCESS)
