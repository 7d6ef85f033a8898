"""Config flow for SARAi: model paths, memory budget, SOLAR server; options; reconfigure; reauth."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from homeassistant.config_entries import (
    ConfigEntry,
    ConfigFlow,
    ConfigFlowResult,
    ConfigSubentryFlow,
    OptionsFlow,
    SubentryFlowResult,
)
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers import llm
from homeassistant.helpers.aiohttp_client import async_get_clientsession
from homeassistant.helpers.selector import (
    BooleanSelector,
    EntitySelector,
    EntitySelectorConfig,
    NumberSelector,
    NumberSelectorConfig,
    NumberSelectorMode,
    SelectOptionDict,
    SelectSelector,
    SelectSelectorConfig,
    SelectSelectorMode,
    TemplateSelector,
    TextSelector,
    TextSelectorConfig,
    TextSelectorType,
)
import probatio as vol

from .const import (
    CONF_CAMERA_ENTITY,
    CONF_CONTEXT_SIZE,
    CONF_GGUF_MODEL,
    CONF_IDLE_UNLOAD_MINUTES,
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    CONF_MEMORY_BUDGET_MB,
    CONF_MMPROJ_MODEL,
    CONF_OMNI_INT8,
    CONF_OMNI_MODEL,
    CONF_PROMPT,
    CONF_ROUTING_MODE,
    CONF_SCAN_INTERVAL_MINUTES,
    CONF_SOLAR_API_KEY,
    CONF_SOLAR_TIMEOUT,
    CONF_SOLAR_URL,
    CONF_TEMPERATURE,
    CONF_VOICE,
    CONF_WARMUP,
    DEFAULT_CAMERA_PROMPT,
    DEFAULT_CONTEXT_SIZE,
    DEFAULT_IDLE_UNLOAD_MINUTES,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MEMORY_BUDGET_MB,
    DEFAULT_PROMPT,
    DEFAULT_SOLAR_TIMEOUT,
    DEFAULT_TEMPERATURE,
    DEFAULT_VOICE,
    DEFAULT_WARMUP,
    DOMAIN,
    MIN_SCAN_INTERVAL_MINUTES,
    ROUTING_MODES,
    SUBENTRY_CAMERA,
    VOICES,
)
from .engine.errors import ModelCorrupt, ModelMissing, RemoteAuthError, RemoteError, RemoteProtocolError
from .engine.models import MB, inspect_gguf, inspect_mmproj, inspect_omni, variant_advice
from .engine.solar import SolarClient


def _user_schema(defaults: Mapping[str, Any]) -> vol.Schema:
    def opt(key: str) -> dict[str, Any]:
        value = defaults.get(key)
        return {"description": {"suggested_value": value}} if value not in (None, "") else {}

    return vol.Schema(
        {
            vol.Required(CONF_GGUF_MODEL, **opt(CONF_GGUF_MODEL)): TextSelector(),
            vol.Optional(CONF_MMPROJ_MODEL, **opt(CONF_MMPROJ_MODEL)): TextSelector(),
            vol.Optional(CONF_OMNI_MODEL, **opt(CONF_OMNI_MODEL)): TextSelector(),
            vol.Required(
                CONF_MEMORY_BUDGET_MB, default=defaults.get(CONF_MEMORY_BUDGET_MB, DEFAULT_MEMORY_BUDGET_MB)
            ): NumberSelector(NumberSelectorConfig(min=256, max=1_000_000, step=1, mode=NumberSelectorMode.BOX)),
            vol.Optional(CONF_SOLAR_URL, **opt(CONF_SOLAR_URL)): TextSelector(
                TextSelectorConfig(type=TextSelectorType.URL)
            ),
            vol.Optional(CONF_SOLAR_API_KEY, **opt(CONF_SOLAR_API_KEY)): TextSelector(
                TextSelectorConfig(type=TextSelectorType.PASSWORD)
            ),
        }
    )


async def _validate_solar(hass: HomeAssistant, url: str, key: str | None) -> str | None:
    client = SolarClient(async_get_clientsession(hass), url, key, total_timeout=15)
    try:
        await client.list_models()
    except RemoteAuthError:
        return "invalid_auth"
    except RemoteProtocolError:
        return "not_openai"
    except RemoteError:
        return "cannot_connect"
    return None


async def validate_input(hass: HomeAssistant, data: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """Check every field; return (errors, description placeholders)."""
    errors: dict[str, str] = {}
    placeholders: dict[str, str] = {}
    gguf = data[CONF_GGUF_MODEL].strip()
    text_info = None
    try:
        info = await hass.async_add_executor_job(inspect_gguf, gguf)
    except ModelMissing:
        errors[CONF_GGUF_MODEL] = "gguf_not_found"
    except ModelCorrupt as err:
        errors[CONF_GGUF_MODEL] = "gguf_architecture" if "architecture" in err.placeholders else "gguf_invalid"
    else:
        text_info = info
        placeholders["variant"] = variant_advice(info.size_bytes)
        placeholders["size_mb"] = str(info.size_bytes // MB)
    if mmproj := (data.get(CONF_MMPROJ_MODEL) or "").strip():
        try:
            await hass.async_add_executor_job(inspect_mmproj, mmproj, text_info)
        except ModelMissing:
            errors[CONF_MMPROJ_MODEL] = "mmproj_not_found"
        except ModelCorrupt as err:
            errors[CONF_MMPROJ_MODEL] = "mmproj_mismatch" if "mismatch" in err.placeholders else "mmproj_invalid"
    if omni := (data.get(CONF_OMNI_MODEL) or "").strip():
        try:
            await hass.async_add_executor_job(inspect_omni, omni)
        except ModelMissing:
            errors[CONF_OMNI_MODEL] = "omni_not_found"
        except ModelCorrupt:
            errors[CONF_OMNI_MODEL] = "omni_invalid"
    if url := (data.get(CONF_SOLAR_URL) or "").strip():
        if error := await _validate_solar(hass, url, data.get(CONF_SOLAR_API_KEY) or None):
            errors[CONF_SOLAR_URL] = error
    return errors, placeholders


def _clean(data: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: (v.strip() if isinstance(v, str) else v) for k, v in data.items()}
    out[CONF_MEMORY_BUDGET_MB] = int(out.get(CONF_MEMORY_BUDGET_MB, DEFAULT_MEMORY_BUDGET_MB))
    return {k: v for k, v in out.items() if v not in ("", None)}


class SaraiConfigFlow(ConfigFlow, domain=DOMAIN):
    """Handle a config flow for SARAi."""

    VERSION = 1

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Ask for model paths, the memory budget and the optional SOLAR server."""
        errors: dict[str, str] = {}
        if user_input is not None:
            errors, _ = await validate_input(self.hass, user_input)
            if not errors:
                await self.async_set_unique_id(DOMAIN)
                self._abort_if_unique_id_configured()
                return self.async_create_entry(title="SARAi", data=_clean(user_input))
        return self.async_show_form(step_id="user", data_schema=_user_schema(user_input or {}), errors=errors)

    async def async_step_reconfigure(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Change model paths, budget or SOLAR server."""
        entry = self._get_reconfigure_entry()
        errors: dict[str, str] = {}
        if user_input is not None:
            errors, _ = await validate_input(self.hass, user_input)
            if not errors:
                return self.async_update_and_abort(entry, data=_clean(user_input))
        return self.async_show_form(
            step_id="reconfigure", data_schema=_user_schema(user_input or entry.data), errors=errors
        )

    async def async_step_reauth(self, entry_data: Mapping[str, Any]) -> ConfigFlowResult:
        """The SOLAR server rejected the key."""
        return await self.async_step_reauth_confirm()

    async def async_step_reauth_confirm(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Ask for a new SOLAR API key."""
        entry = self._get_reauth_entry()
        errors: dict[str, str] = {}
        if user_input is not None:
            key = user_input.get(CONF_SOLAR_API_KEY) or None
            if error := await _validate_solar(self.hass, entry.data[CONF_SOLAR_URL], key):
                errors["base"] = error
            else:
                return self.async_update_and_abort(entry, data_updates={CONF_SOLAR_API_KEY: key or ""})
        return self.async_show_form(
            step_id="reauth_confirm",
            data_schema=vol.Schema(
                {vol.Optional(CONF_SOLAR_API_KEY): TextSelector(TextSelectorConfig(type=TextSelectorType.PASSWORD))}
            ),
            errors=errors,
            description_placeholders={"url": entry.data.get(CONF_SOLAR_URL, "")},
        )

    @classmethod
    @callback
    def async_get_supported_subentry_types(cls, config_entry: ConfigEntry) -> dict[str, type[ConfigSubentryFlow]]:
        """Camera analyses are subentries: one image-processing entity each."""
        return {SUBENTRY_CAMERA: CameraSubentryFlow}

    @staticmethod
    @callback
    def async_get_options_flow(config_entry: ConfigEntry) -> OptionsFlow:
        """Options: prompt, sampling, context, warm-up, idle unload, routing, voice, tools."""
        return SaraiOptionsFlow()


class SaraiOptionsFlow(OptionsFlow):
    """SARAi options; the entry's update listener reloads it when they change."""

    async def async_step_init(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Show and save the options."""
        if user_input is not None:
            if not user_input.get(CONF_LLM_HASS_API):
                user_input.pop(CONF_LLM_HASS_API, None)
            return self.async_create_entry(data=user_input)
        options = self.config_entry.options
        apis = [SelectOptionDict(label=api.name, value=api.id) for api in llm.async_get_apis(self.hass)]
        default_mode = "auto" if self.config_entry.data.get(CONF_SOLAR_URL) else "local"
        schema = vol.Schema(
            {
                vol.Optional(
                    CONF_PROMPT, description={"suggested_value": options.get(CONF_PROMPT, DEFAULT_PROMPT)}
                ): TemplateSelector(),
                vol.Optional(
                    CONF_LLM_HASS_API,
                    description={"suggested_value": options.get(CONF_LLM_HASS_API, [llm.LLM_API_ASSIST])},
                ): SelectSelector(SelectSelectorConfig(options=apis, multiple=True)),
                vol.Optional(
                    CONF_TEMPERATURE, default=options.get(CONF_TEMPERATURE, DEFAULT_TEMPERATURE)
                ): NumberSelector(NumberSelectorConfig(min=0, max=2, step=0.05)),
                vol.Optional(CONF_MAX_TOKENS, default=options.get(CONF_MAX_TOKENS, DEFAULT_MAX_TOKENS)): NumberSelector(
                    NumberSelectorConfig(min=16, max=8192, step=1, mode=NumberSelectorMode.BOX)
                ),
                vol.Optional(
                    CONF_CONTEXT_SIZE, default=options.get(CONF_CONTEXT_SIZE, DEFAULT_CONTEXT_SIZE)
                ): NumberSelector(NumberSelectorConfig(min=512, max=131072, step=256, mode=NumberSelectorMode.BOX)),
                vol.Optional(CONF_WARMUP, default=options.get(CONF_WARMUP, DEFAULT_WARMUP)): BooleanSelector(),
                vol.Optional(
                    CONF_IDLE_UNLOAD_MINUTES, default=options.get(CONF_IDLE_UNLOAD_MINUTES, DEFAULT_IDLE_UNLOAD_MINUTES)
                ): NumberSelector(NumberSelectorConfig(min=0, max=1440, step=1, mode=NumberSelectorMode.BOX)),
                vol.Optional(CONF_ROUTING_MODE, default=options.get(CONF_ROUTING_MODE, default_mode)): SelectSelector(
                    SelectSelectorConfig(
                        options=ROUTING_MODES, translation_key=CONF_ROUTING_MODE, mode=SelectSelectorMode.DROPDOWN
                    )
                ),
                vol.Optional(CONF_VOICE, default=options.get(CONF_VOICE, DEFAULT_VOICE)): SelectSelector(
                    SelectSelectorConfig(options=VOICES, mode=SelectSelectorMode.DROPDOWN)
                ),
                vol.Optional(
                    CONF_SOLAR_TIMEOUT, default=options.get(CONF_SOLAR_TIMEOUT, DEFAULT_SOLAR_TIMEOUT)
                ): NumberSelector(NumberSelectorConfig(min=1, max=600, step=1, mode=NumberSelectorMode.BOX)),
                vol.Optional(CONF_OMNI_INT8, default=options.get(CONF_OMNI_INT8, False)): BooleanSelector(),
            }
        )
        return self.async_show_form(step_id="init", data_schema=schema)


def _camera_schema(defaults: Mapping[str, Any]) -> vol.Schema:
    return vol.Schema(
        {
            vol.Required(CONF_CAMERA_ENTITY, default=defaults.get(CONF_CAMERA_ENTITY, vol.UNDEFINED)): EntitySelector(
                EntitySelectorConfig(domain="camera")
            ),
            vol.Required(CONF_PROMPT, default=defaults.get(CONF_PROMPT, DEFAULT_CAMERA_PROMPT)): TextSelector(
                TextSelectorConfig(multiline=True)
            ),
            vol.Required(
                CONF_SCAN_INTERVAL_MINUTES, default=defaults.get(CONF_SCAN_INTERVAL_MINUTES, 0)
            ): NumberSelector(NumberSelectorConfig(min=0, max=1440, step=1, mode=NumberSelectorMode.BOX)),
        }
    )


class CameraSubentryFlow(ConfigSubentryFlow):
    """Add or change a camera analysis (camera + question + optional interval)."""

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> SubentryFlowResult:
        """Pick a camera and a question."""
        entry = self._get_entry()
        errors: dict[str, str] = {}
        if user_input is not None:
            if error := self._check(user_input):
                errors[CONF_SCAN_INTERVAL_MINUTES] = error
            elif any(
                s.data.get(CONF_CAMERA_ENTITY) == user_input[CONF_CAMERA_ENTITY]
                and s.data.get(CONF_PROMPT) == user_input[CONF_PROMPT]
                for s in entry.subentries.values()
            ):
                return self.async_abort(reason="already_configured")
            else:
                return self.async_create_entry(title=self._title(user_input), data=self._data(user_input))
        return self.async_show_form(step_id="user", data_schema=_camera_schema(user_input or {}), errors=errors)

    async def async_step_reconfigure(self, user_input: dict[str, Any] | None = None) -> SubentryFlowResult:
        """Change the camera, question or interval."""
        subentry = self._get_reconfigure_subentry()
        errors: dict[str, str] = {}
        if user_input is not None:
            if error := self._check(user_input):
                errors[CONF_SCAN_INTERVAL_MINUTES] = error
            else:
                return self.async_update_and_abort(
                    self._get_entry(), subentry, title=self._title(user_input), data=self._data(user_input)
                )
        return self.async_show_form(
            step_id="reconfigure", data_schema=_camera_schema(user_input or subentry.data), errors=errors
        )

    @staticmethod
    def _check(user_input: Mapping[str, Any]) -> str | None:
        minutes = float(user_input.get(CONF_SCAN_INTERVAL_MINUTES, 0))
        return "interval_too_short" if 0 < minutes < MIN_SCAN_INTERVAL_MINUTES else None

    @staticmethod
    def _data(user_input: Mapping[str, Any]) -> dict[str, Any]:
        return {
            CONF_CAMERA_ENTITY: user_input[CONF_CAMERA_ENTITY],
            CONF_PROMPT: str(user_input[CONF_PROMPT]).strip(),
            CONF_SCAN_INTERVAL_MINUTES: int(user_input.get(CONF_SCAN_INTERVAL_MINUTES, 0)),
        }

    def _title(self, user_input: Mapping[str, Any]) -> str:
        state = self.hass.states.get(user_input[CONF_CAMERA_ENTITY])
        name = state.name if state is not None else user_input[CONF_CAMERA_ENTITY]
        return f"{name} analysis"
