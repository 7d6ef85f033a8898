"""Helpers shared by the tests."""

from __future__ import annotations

from typing import Any

from homeassistant.components import stt
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant


async def setup_entry(hass: HomeAssistant, entry: Any) -> None:
    """Add the entry and set it up; it must load."""
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED


def speech_metadata(rate: int = 16000) -> stt.SpeechMetadata:
    """Metadata of a 16-bit mono PCM WAV stream in Spanish."""
    return stt.SpeechMetadata(
        language="es",
        format=stt.AudioFormats.WAV,
        codec=stt.AudioCodecs.PCM,
        bit_rate=stt.AudioBitRates.BITRATE_16,
        sample_rate=rate,  # type: ignore[arg-type]
        channel=stt.AudioChannels.CHANNEL_MONO,
    )
