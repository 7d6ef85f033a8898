"""SARAi: one private, local, multimodal Qwen2.5-Omni assistant for Home Assistant."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Any

from homeassistant.config_entries import ConfigEntry, ConfigSubentry
from homeassistant.const import EVENT_HOMEASSISTANT_STOP, Platform
from homeassistant.core import Event, HomeAssistant, callback
from homeassistant.exceptions import ConfigEntryError, ConfigEntryNotReady
from homeassistant.helpers import (
    config_validation as cv,
    device_registry as dr,
    entity_registry as er,
    issue_registry as ir,
    llm,
)
from homeassistant.helpers.aiohttp_client import async_get_clientsession
from homeassistant.helpers.event import async_track_time_interval
from homeassistant.helpers.typing import ConfigType
from homeassistant.setup import async_setup_component

from .const import (
    AGENT_OPTION_KEYS,
    CONF_CONTEXT_SIZE,
    CONF_GGUF_MODEL,
    CONF_IDLE_UNLOAD_MINUTES,
    CONF_LLM_HASS_API,
    CONF_MEMORY_BUDGET_MB,
    CONF_MMPROJ_MODEL,
    CONF_OMNI_INT8,
    CONF_OMNI_MODEL,
    CONF_PLACEMENT,
    CONF_ROUTING_MODE,
    CONF_SERVER_API_KEY,
    CONF_SERVER_URL,
    CONF_SOLAR_API_KEY,
    CONF_SOLAR_TIMEOUT,
    CONF_SOLAR_URL,
    CONF_THREADS,
    CONF_WARMUP,
    DEFAULT_AI_TASK_NAME,
    DEFAULT_CONTEXT_SIZE,
    DEFAULT_CONVERSATION_NAME,
    DEFAULT_MEMORY_BUDGET_MB,
    DEFAULT_SOLAR_TIMEOUT,
    DOMAIN,
    LOGGER,
    PLACEMENT_IN_PROCESS,
    PLACEMENT_SERVER,
    SUBENTRY_AI_TASK,
    SUBENTRY_CAMERA,
    SUBENTRY_CONVERSATION,
)
from .engine import EngineConfig, SaraiEngine
from .engine.errors import DependencyMissing, ModelCorrupt, ModelMissing
from .engine.prompt_cache import delete_cache_dir
from .engine.remote import InferenceUnavailable
from .requirements import install_requirements, missing_requirements
from .services import async_setup_services

PLATFORMS = [Platform.AI_TASK, Platform.CONVERSATION, Platform.SENSOR, Platform.STT, Platform.TTS]
CONFIG_SCHEMA = cv.config_entry_only_config_schema(DOMAIN)


@dataclass
class SaraiData:
    """What a loaded entry holds."""

    engine: SaraiEngine
    image_processing: bool = False


type SaraiConfigEntry = ConfigEntry[SaraiData]


def engine_config(entry: ConfigEntry, cache_dir: str | None = None) -> EngineConfig:
    """Build the engine's plain configuration from the entry (the engine settings, not the assistants')."""
    data, options = entry.data, entry.options
    solar_url = data.get(CONF_SOLAR_URL) or None
    threads = int(options.get(CONF_THREADS, 0) or 0)
    return EngineConfig(
        placement=data.get(CONF_PLACEMENT, PLACEMENT_IN_PROCESS),
        server_url=data.get(CONF_SERVER_URL) or None,
        server_api_key=data.get(CONF_SERVER_API_KEY) or None,
        gguf_model=data.get(CONF_GGUF_MODEL) or None,
        mmproj_model=data.get(CONF_MMPROJ_MODEL) or None,
        omni_model=data.get(CONF_OMNI_MODEL) or None,
        memory_budget_mb=int(data.get(CONF_MEMORY_BUDGET_MB, DEFAULT_MEMORY_BUDGET_MB)),
        n_ctx=int(options.get(CONF_CONTEXT_SIZE, DEFAULT_CONTEXT_SIZE)),
        n_threads=threads or None,
        solar_url=solar_url,
        solar_api_key=data.get(CONF_SOLAR_API_KEY) or None,
        routing_mode=options.get(CONF_ROUTING_MODE, "auto" if solar_url else "local"),
        solar_timeout_s=float(options.get(CONF_SOLAR_TIMEOUT, DEFAULT_SOLAR_TIMEOUT)),
        omni_int8=bool(options.get(CONF_OMNI_INT8, False)),
        cache_dir=cache_dir,
    )


async def async_setup(hass: HomeAssistant, config: ConfigType) -> bool:
    """Register the actions (they answer with a clear error while no entry is loaded)."""
    async_setup_services(hass)
    return True


async def async_setup_entry(hass: HomeAssistant, entry: SaraiConfigEntry) -> bool:
    """Validate the model files, build the engine, set up the platforms."""

    @callback
    def _auth_failed() -> None:
        entry.async_start_reauth(hass)

    config = engine_config(entry, prompt_cache_dir(hass, entry))
    session = async_get_clientsession(hass)
    if config.placement != PLACEMENT_SERVER and (
        missing := await hass.async_add_executor_job(missing_requirements, bool(config.omni_model))
    ):  # installed once more (Home Assistant's requirements machinery); what still fails is reported below
        await install_requirements(hass, missing)
    try:
        engine = await hass.async_add_executor_job(SaraiEngine, config, session, _auth_failed)
        await engine.async_start()
    except InferenceUnavailable as err:
        raise ConfigEntryNotReady(
            translation_domain=DOMAIN, translation_key=err.translation_key, translation_placeholders=err.placeholders
        ) from err
    except DependencyMissing as err:
        LOGGER.error("SARAi cannot run in Home Assistant's process: %s", err)
        raise ConfigEntryError(
            translation_domain=DOMAIN, translation_key=err.translation_key, translation_placeholders=err.placeholders
        ) from err
    except (ModelMissing, ModelCorrupt) as err:
        LOGGER.debug("Model check failed: %s", err)
        ir.async_create_issue(
            hass,
            DOMAIN,
            "model_unusable",
            is_fixable=False,
            severity=ir.IssueSeverity.ERROR,
            translation_key="model_unusable",
            translation_placeholders={"file": err.placeholders.get("file", "")},
        )
        raise ConfigEntryError(
            translation_domain=DOMAIN, translation_key=err.translation_key, translation_placeholders=err.placeholders
        ) from err
    ir.async_delete_issue(hass, DOMAIN, "model_unusable")
    needed_mb = engine.text.estimate_bytes() // (1024 * 1024) if config.placement != PLACEMENT_SERVER else 0
    if needed_mb > config.memory_budget_mb:
        LOGGER.warning(
            "The memory budget (%s MB) cannot hold the text model (~%s MB): answers need the SOLAR server",
            config.memory_budget_mb,
            needed_mb,
        )
        ir.async_create_issue(
            hass,
            DOMAIN,
            "budget_too_small",
            is_fixable=False,
            severity=ir.IssueSeverity.WARNING,
            translation_key="budget_too_small",
            translation_placeholders={"needed_mb": str(needed_mb), "budget_mb": str(config.memory_budget_mb)},
        )
    else:
        ir.async_delete_issue(hass, DOMAIN, "budget_too_small")
    entry.runtime_data = SaraiData(engine)
    _async_placement_issues(hass, entry, engine)
    LOGGER.debug(
        "Engine ready: capabilities %s, budget %d MB, text model ~%d MB, context %d, threads %s, %d sub-entries",
        engine.capabilities,
        config.memory_budget_mb,
        needed_mb,
        config.n_ctx,
        config.n_threads or "physical cores",
        len(entry.subentries),
    )
    if not engine.can("hear"):
        LOGGER.info("Speech-to-text is off: configure the mmproj (mmproj_model) or the Omni checkpoint (omni_model)")
    if not engine.can("speak"):
        LOGGER.info("Text-to-speech and time-aligned video are off: configure the Omni checkpoint (omni_model)")

    async def _stop(_event: Event) -> None:
        await engine.close()

    entry.async_on_unload(hass.bus.async_listen(EVENT_HOMEASSISTANT_STOP, _stop))
    idle = int(entry.options.get(CONF_IDLE_UNLOAD_MINUTES, 0))
    if idle > 0:

        async def _unload_idle(_now: object) -> None:
            for name in await engine.unload_idle(idle * 60):
                LOGGER.debug("Unloaded idle backend %s", name)

        entry.async_on_unload(async_track_time_interval(hass, _unload_idle, timedelta(minutes=1)))

    await hass.config_entries.async_forward_entry_setups(entry, PLATFORMS)
    if any(s.subentry_type == SUBENTRY_CAMERA for s in entry.subentries.values()):
        await _async_setup_image_processing(hass, entry)
    entry.async_on_unload(entry.add_update_listener(_async_update_listener))
    if entry.options.get(CONF_WARMUP) and not any(
        s.subentry_type == SUBENTRY_CONVERSATION for s in entry.subentries.values()
    ):  # conversation agents warm up themselves, prefilling their own prompts
        entry.async_create_background_task(hass, engine.warmup(), "sarai warm-up")
    return True


@callback
def _async_placement_issues(hass: HomeAssistant, entry: SaraiConfigEntry, engine: SaraiEngine) -> None:
    """Say what a server does not serve (log + repair), and watch the worker for a crash loop."""
    missing = [c for c in ("hear", "see", "speak", "video") if not engine.can(c)]
    if engine.remote is not None and not engine.remote.supports_tools:
        LOGGER.warning(
            "The inference server's chat template ignores tools: assistants cannot control Home Assistant. "
            "Start llama-server with --chat-template-file and Qwen2.5's tool-calling template"
        )
        missing.append("tools")
    if engine.placement == PLACEMENT_SERVER and missing:
        kind = engine.remote.server_kind if engine.remote is not None else None
        LOGGER.info(
            "The %s server does not serve %s: those entities are not created", kind or "inference", ", ".join(missing)
        )
        ir.async_create_issue(
            hass,
            DOMAIN,
            "server_capabilities",
            is_fixable=False,
            severity=ir.IssueSeverity.WARNING,
            translation_key="server_capabilities",
            translation_placeholders={"server": kind or "OpenAI-compatible", "missing": ", ".join(missing)},
        )
    else:
        ir.async_delete_issue(hass, DOMAIN, "server_capabilities")
    ir.async_delete_issue(hass, DOMAIN, "worker_crash_loop")

    @callback
    def _crash_loop(crashes: int) -> None:
        ir.async_create_issue(
            hass,
            DOMAIN,
            "worker_crash_loop",
            is_fixable=False,
            severity=ir.IssueSeverity.ERROR,
            translation_key="worker_crash_loop",
            translation_placeholders={"crashes": str(crashes)},
        )

    engine.on_crash_loop = _crash_loop
    if engine.remote is not None:
        remote = engine.remote

        async def _refresh(_now: object) -> None:
            await remote.refresh_status()

        entry.async_on_unload(async_track_time_interval(hass, _refresh, timedelta(seconds=30)))


async def _async_setup_image_processing(hass: HomeAssistant, entry: SaraiConfigEntry) -> None:
    """image_processing is YAML-only: hand our platform to its entity component for this entry."""
    from homeassistant.components.image_processing.const import DATA_COMPONENT

    if not await async_setup_component(hass, "image_processing", {}):
        LOGGER.warning("image_processing could not be set up; camera analyses are off")
        return
    await hass.data[DATA_COMPONENT].async_setup_entry(entry)
    entry.runtime_data.image_processing = True


async def _async_update_listener(hass: HomeAssistant, entry: SaraiConfigEntry) -> None:
    """Options, data or sub-entries changed: reload."""
    await hass.config_entries.async_reload(entry.entry_id)


async def async_unload_entry(hass: HomeAssistant, entry: SaraiConfigEntry) -> bool:
    """Unload platforms (and the camera analyses) and release every model."""
    unloaded = await hass.config_entries.async_unload_platforms(entry, PLATFORMS)
    if unloaded and entry.runtime_data.image_processing:
        from homeassistant.components.image_processing.const import DATA_COMPONENT

        unloaded = await hass.data[DATA_COMPONENT].async_unload_entry(entry)
    if unloaded:
        await entry.runtime_data.engine.close()
    return unloaded


def prompt_cache_dir(hass: HomeAssistant, entry: ConfigEntry) -> str:
    """Where prefilled prompt states are kept: Home Assistant's cache directory (not backed up; they hold the
    system prompt's tokens, exposed entity names included, so they are as private as .storage)."""
    return hass.config.cache_path(DOMAIN, entry.entry_id)


async def async_remove_entry(hass: HomeAssistant, entry: ConfigEntry) -> None:
    """Removing SARAi deletes its prompt states."""
    removed = await hass.async_add_executor_job(delete_cache_dir, prompt_cache_dir(hass, entry))
    LOGGER.debug("Deleted %d prompt-state files", removed)


async def async_migrate_entry(hass: HomeAssistant, entry: ConfigEntry) -> bool:
    """Version 1 kept one assistant in the entry's options; version 2 keeps each assistant in a sub-entry.

    The options become one ``conversation`` and one ``ai_task_data`` sub-entry; the existing entities move
    to them with the same entity ids (their unique ids become the sub-entries' ids).
    """
    if entry.version > 2:
        return False  # a downgrade: this version cannot read a newer entry
    if entry.version == 1:
        options: dict[str, Any] = dict(entry.options)
        agent = {k: options[k] for k in AGENT_OPTION_KEYS if k in options}
        options = {k: v for k, v in options.items() if k not in AGENT_OPTION_KEYS or k == CONF_ROUTING_MODE}
        agent.setdefault(CONF_LLM_HASS_API, [llm.LLM_API_ASSIST])  # version 1's default when unset
        ent_reg = er.async_get(hass)
        for subentry_type, title, platform, old_key in (
            (SUBENTRY_CONVERSATION, DEFAULT_CONVERSATION_NAME, "conversation", "conversation"),
            (SUBENTRY_AI_TASK, DEFAULT_AI_TASK_NAME, "ai_task", "ai_task"),
        ):
            subentry = ConfigSubentry(
                data=MappingProxyType(dict(agent)), subentry_type=subentry_type, title=title, unique_id=None
            )
            hass.config_entries.async_add_subentry(entry, subentry)
            entity_id = ent_reg.async_get_entity_id(platform, DOMAIN, f"{entry.entry_id}_{old_key}")
            if entity_id is not None:
                ent_reg.async_update_entity(
                    entity_id, config_subentry_id=subentry.subentry_id, new_unique_id=subentry.subentry_id
                )
        for subentry in list(entry.subentries.values()):
            if subentry.subentry_type != SUBENTRY_CAMERA:
                continue
            old_id = f"{entry.entry_id}_camera_{subentry.subentry_id}"
            if (entity_id := ent_reg.async_get_entity_id("image_processing", DOMAIN, old_id)) is not None:
                ent_reg.async_update_entity(
                    entity_id, config_subentry_id=subentry.subentry_id, new_unique_id=subentry.subentry_id
                )
        # Version 1 let camera analyses move the engine's device to their sub-entry: give it back to the entry.
        dev_reg = dr.async_get(hass)
        if (device := dev_reg.async_get_device_by_identifier((DOMAIN, entry.entry_id), entry.entry_id)) is not None:
            if device.config_subentry_id is not None:
                dev_reg.async_update_device(device.id, new_config_subentry_id=None)
        hass.config_entries.async_update_entry(entry, options=options, version=2, minor_version=1)
        LOGGER.info("Moved SARAi's assistant settings into sub-entries (config entry version 2)")
    return True
