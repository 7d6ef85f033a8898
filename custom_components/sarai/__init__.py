"""SARAi: one private, local, multimodal Qwen2.5-Omni assistant for Home Assistant."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from homeassistant.config_entries import ConfigEntry
from homeassistant.const import EVENT_HOMEASSISTANT_STOP, Platform
from homeassistant.core import Event, HomeAssistant, callback
from homeassistant.exceptions import ConfigEntryError
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.aiohttp_client import async_get_clientsession
from homeassistant.helpers.event import async_track_time_interval

from .const import (
    CONF_CONTEXT_SIZE,
    CONF_GGUF_MODEL,
    CONF_IDLE_UNLOAD_MINUTES,
    CONF_MEMORY_BUDGET_MB,
    CONF_MMPROJ_MODEL,
    CONF_OMNI_MODEL,
    CONF_ROUTING_MODE,
    CONF_SOLAR_API_KEY,
    CONF_SOLAR_URL,
    CONF_WARMUP,
    DEFAULT_CONTEXT_SIZE,
    DEFAULT_MEMORY_BUDGET_MB,
    DOMAIN,
    LOGGER,
)
from .engine import EngineConfig, SaraiEngine
from .engine.errors import ModelCorrupt, ModelMissing

PLATFORMS = [Platform.CONVERSATION, Platform.SENSOR, Platform.STT, Platform.TTS]


@dataclass
class SaraiData:
    """What a loaded entry holds."""

    engine: SaraiEngine
    listeners: list[object] = field(default_factory=list)


type SaraiConfigEntry = ConfigEntry[SaraiData]


def engine_config(entry: ConfigEntry) -> EngineConfig:
    """Build the engine's plain configuration from the entry."""
    data, options = entry.data, entry.options
    solar_url = data.get(CONF_SOLAR_URL) or None
    return EngineConfig(
        gguf_model=data[CONF_GGUF_MODEL],
        mmproj_model=data.get(CONF_MMPROJ_MODEL) or None,
        omni_model=data.get(CONF_OMNI_MODEL) or None,
        memory_budget_mb=int(data.get(CONF_MEMORY_BUDGET_MB, DEFAULT_MEMORY_BUDGET_MB)),
        n_ctx=int(options.get(CONF_CONTEXT_SIZE, DEFAULT_CONTEXT_SIZE)),
        solar_url=solar_url,
        solar_api_key=data.get(CONF_SOLAR_API_KEY) or None,
        routing_mode=options.get(CONF_ROUTING_MODE, "auto" if solar_url else "local"),
    )


async def async_setup_entry(hass: HomeAssistant, entry: SaraiConfigEntry) -> bool:
    """Validate the model files, build the engine, set up the platforms."""

    @callback
    def _auth_failed() -> None:
        entry.async_start_reauth(hass)

    config = engine_config(entry)
    session = async_get_clientsession(hass)
    try:
        engine = await hass.async_add_executor_job(SaraiEngine, config, session, _auth_failed)
    except (ModelMissing, ModelCorrupt) as err:
        ir.async_create_issue(
            hass,
            DOMAIN,
            "model_unusable",
            is_fixable=False,
            severity=ir.IssueSeverity.ERROR,
            translation_key="model_unusable",
            translation_placeholders={"error": str(err)},
        )
        raise ConfigEntryError(
            translation_domain=DOMAIN, translation_key=err.translation_key, translation_placeholders=err.placeholders
        ) from err
    ir.async_delete_issue(hass, DOMAIN, "model_unusable")
    entry.runtime_data = SaraiData(engine)
    if not engine.can("hear"):
        LOGGER.info("Speech-to-text and text-to-speech are off: configure the Omni checkpoint (omni_model)")

    async def _stop(_event: Event) -> None:
        await engine.close()

    entry.async_on_unload(hass.bus.async_listen_once(EVENT_HOMEASSISTANT_STOP, _stop))
    idle = int(entry.options.get(CONF_IDLE_UNLOAD_MINUTES, 0))
    if idle > 0:

        async def _unload_idle(_now: object) -> None:
            for name in await engine.unload_idle(idle * 60):
                LOGGER.debug("Unloaded idle backend %s", name)

        entry.async_on_unload(async_track_time_interval(hass, _unload_idle, timedelta(minutes=1)))

    await hass.config_entries.async_forward_entry_setups(entry, PLATFORMS)
    if entry.options.get(CONF_WARMUP):
        entry.async_create_background_task(hass, engine.warmup(), "sarai warm-up")
    return True


async def async_unload_entry(hass: HomeAssistant, entry: SaraiConfigEntry) -> bool:
    """Unload platforms and release every model."""
    unloaded = await hass.config_entries.async_unload_platforms(entry, PLATFORMS)
    if unloaded:
        await entry.runtime_data.engine.close()
    return unloaded
