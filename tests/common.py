"""Helpers shared by the tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
import io
from typing import Any
import wave

from aiohttp import web
from homeassistant.components import stt
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
import numpy as np


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


def tone_wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """A 220 Hz tone as a 16-bit mono WAV."""
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


async def chunked(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    """``data`` as an audio stream of ``size``-byte chunks."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


@asynccontextmanager
async def local_server(app: web.Application, release: asyncio.Event | None = None) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 (the only address the harness allows); yield its base URL.

    On exit ``release`` is set first, so that handlers waiting on it end before the runner stops
    (the harness fails tests that leave tasks behind).
    """
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        if release is not None:
            release.set()
            await asyncio.sleep(0.05)
        await runner.cleanup()


async def start_flow(hass: HomeAssistant, placement: str = "in_process") -> Any:
    """Start the config flow and pick where the model runs; return the form of that step."""
    from homeassistant import config_entries

    from custom_components.sarai.const import DOMAIN

    menu = await hass.config_entries.flow.async_init(DOMAIN, context={"source": config_entries.SOURCE_USER})
    assert menu["type"] == "menu", menu
    return await hass.config_entries.flow.async_configure(menu["flow_id"], {"next_step_id": placement})


def add_camera_analysis(
    hass: HomeAssistant, entry: Any, title: str = "Front door", prompt: str = "¿Hay alguien?"
) -> None:
    """Add a camera analysis sub-entry for camera.front_door (on demand) to an entry not yet set up."""
    from homeassistant.config_entries import ConfigSubentry

    hass.config_entries.async_add_subentry(
        entry,
        ConfigSubentry(
            data={"camera_entity": "camera.front_door", "prompt": prompt, "scan_interval_minutes": 0},
            subentry_type="camera",
            title=title,
            unique_id=None,
        ),
    )
