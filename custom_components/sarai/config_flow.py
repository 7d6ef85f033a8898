"""Config flow for SARAi: model paths, memory budget, SOLAR server; options; reconfigure; reauth."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from homeassistant.config_entries import (
    SOURCE_RECONFIGURE,
    ConfigEntry,
    ConfigEntryState,
    ConfigFlow,
    ConfigFlowResult,
    ConfigSubentryFlow,
    OptionsFlow,
    SubentryFlowResult,
)
from homeassistant.const import CONF_NAME
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
from homeassistant.helpers.service_info.hassio import HassioServiceInfo
import probatio as vol

from .const import (
    CONF_CAMERA_ENTITY,
    CONF_CONTEXT_SIZE,
    CONF_GGUF_MODEL,
    CONF_HISTORY_TURNS,
    CONF_IDLE_UNLOAD_MINUTES,
    CONF_LLM_HASS_API,
    CONF_MAX_TOKENS,
    CONF_MEMORY_BUDGET_MB,
    CONF_MMPROJ_MODEL,
    CONF_OMNI_INT8,
    CONF_OMNI_MODEL,
    CONF_PLACEMENT,
    CONF_PROMPT,
    CONF_ROUTING_MODE,
    CONF_SCAN_INTERVAL_MINUTES,
    CONF_SERVER_API_KEY,
    CONF_SERVER_URL,
    CONF_SOLAR_API_KEY,
    CONF_SOLAR_TIMEOUT,
    CONF_SOLAR_URL,
    CONF_TEMPERATURE,
    CONF_THREADS,
    CONF_VOICE,
    CONF_WARMUP,
    DEFAULT_AI_TASK_NAME,
    DEFAULT_AI_TASK_TEMPERATURE,
    DEFAULT_CAMERA_PROMPTS,
    DEFAULT_CONTEXT_SIZE,
    DEFAULT_CONVERSATION_NAME,
    DEFAULT_HISTORY_TURNS,
    DEFAULT_IDLE_UNLOAD_MINUTES,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MEMORY_BUDGET_MB,
    DEFAULT_PROMPT,
    DEFAULT_SOLAR_TIMEOUT,
    DEFAULT_TEMPERATURE,
    DEFAULT_VOICE,
    DEFAULT_WARMUP,
    DOMAIN,
    LLAMA_CPP_REQUIREMENT,
    MIN_SCAN_INTERVAL_MINUTES,
    OMNI_REQUIREMENTS,
    PLACEMENT_IN_PROCESS,
    PLACEMENT_SERVER,
    PLACEMENT_WORKER,
    PLACEMENTS,
    ROUTING_MODES,
    SUBENTRY_AI_TASK,
    SUBENTRY_CAMERA,
    SUBENTRY_CONVERSATION,
    VOICES,
)
from .engine.errors import (
    EngineError,
    InvalidInput,
    ModelCorrupt,
    ModelMissing,
    RemoteAuthError,
    RemoteError,
    RemoteProtocolError,
)
from .engine.models import MB, inspect_gguf, inspect_mmproj, inspect_omni, variant_advice
from .engine.openai_client import OpenAIClient
from .engine.solar import redact_url, validate_api_key, validate_url
from .requirements import install_requirements, missing_requirements, package_names

# The example SOLAR URL is a description placeholder: translation strings may not hold URLs.
URL_EXAMPLE = {"url_example": "http://192.168.1.20:8080/v1"}


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


def _server_schema(defaults: Mapping[str, Any]) -> vol.Schema:
    def opt(key: str) -> dict[str, Any]:
        value = defaults.get(key)
        return {"description": {"suggested_value": value}} if value not in (None, "") else {}

    return vol.Schema(
        {
            vol.Required(CONF_SERVER_URL, **opt(CONF_SERVER_URL)): TextSelector(
                TextSelectorConfig(type=TextSelectorType.URL)
            ),
            vol.Optional(CONF_SERVER_API_KEY, **opt(CONF_SERVER_API_KEY)): TextSelector(
                TextSelectorConfig(type=TextSelectorType.PASSWORD)
            ),
            vol.Optional(CONF_SOLAR_URL, **opt(CONF_SOLAR_URL)): TextSelector(
                TextSelectorConfig(type=TextSelectorType.URL)
            ),
            vol.Optional(CONF_SOLAR_API_KEY, **opt(CONF_SOLAR_API_KEY)): TextSelector(
                TextSelectorConfig(type=TextSelectorType.PASSWORD)
            ),
        }
    )


async def _validate_endpoint(
    hass: HomeAssistant, url: str, key: str | None, url_field: str, key_field: str, *, probe: bool
) -> tuple[str, str] | None:
    """(field, error) when an OpenAI-compatible server's URL or key is unusable, else None.

    ``probe``: an inference server, which must say it can chat; otherwise (SOLAR) ``/v1/models`` answering is enough.
    """
    try:
        url = validate_url(url)
    except InvalidInput:
        return url_field, "invalid_url"
    try:
        key = validate_api_key(key)
    except InvalidInput:
        return key_field, "invalid_api_key"
    client = OpenAIClient(async_get_clientsession(hass), url, key, total_timeout=15, read_timeout=15)
    try:
        if probe:
            capabilities = await client.probe()
        else:
            await client.list_models()
            capabilities = {"chat"}
    except RemoteAuthError:
        return key_field, "invalid_auth"
    except RemoteProtocolError:
        return url_field, "not_openai"
    except RemoteError, EngineError:
        return url_field, "cannot_connect"
    return None if "chat" in capabilities else (url_field, "not_openai")


async def _validate_server(hass: HomeAssistant, url: str, key: str | None) -> tuple[str, str] | None:
    """The inference server (placement "server")."""
    return await _validate_endpoint(hass, url, key, CONF_SERVER_URL, CONF_SERVER_API_KEY, probe=True)


async def _validate_solar(hass: HomeAssistant, url: str, key: str | None) -> tuple[str, str] | None:
    """The SOLAR fallback server."""
    return await _validate_endpoint(hass, url, key, CONF_SOLAR_URL, CONF_SOLAR_API_KEY, probe=False)


async def _validate_server_form(hass: HomeAssistant, data: Mapping[str, Any]) -> dict[str, str]:
    """The server placement's form: the inference server, then the optional SOLAR server."""
    problem = await _validate_server(hass, data[CONF_SERVER_URL], data.get(CONF_SERVER_API_KEY))
    if problem is None and (url := data.get(CONF_SOLAR_URL)):
        problem = await _validate_solar(hass, url, data.get(CONF_SOLAR_API_KEY))
    return {problem[0]: problem[1]} if problem is not None else {}


def _file_error(err: ModelCorrupt, field: str) -> str | None:
    """The form error for a path that is not a regular file, or a model file cut short."""
    if err.translation_key == "file_not_regular":
        return "file_not_regular"
    if err.translation_key == "model_truncated":
        return f"{field}_truncated"
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
        errors[CONF_GGUF_MODEL] = _file_error(err, "gguf") or (
            "gguf_architecture" if "architecture" in err.placeholders else "gguf_invalid"
        )
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
            errors[CONF_MMPROJ_MODEL] = _file_error(err, "mmproj") or (
                "mmproj_mismatch" if "mismatch" in err.placeholders else "mmproj_invalid"
            )
    if omni := (data.get(CONF_OMNI_MODEL) or "").strip():
        try:
            await hass.async_add_executor_job(inspect_omni, omni)
        except ModelMissing:
            errors[CONF_OMNI_MODEL] = "omni_not_found"
        except ModelCorrupt as err:
            errors[CONF_OMNI_MODEL] = _file_error(err, "omni") or "omni_invalid"
    if url := (data.get(CONF_SOLAR_URL) or "").strip():
        if problem := await _validate_solar(hass, url, data.get(CONF_SOLAR_API_KEY) or None):
            errors[problem[0]] = problem[1]
    elif data.get(CONF_SOLAR_API_KEY):
        try:
            validate_api_key(data[CONF_SOLAR_API_KEY])
        except InvalidInput:
            errors[CONF_SOLAR_API_KEY] = "invalid_api_key"
    return errors, placeholders


def _clean(data: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: (v.strip() if isinstance(v, str) else v) for k, v in data.items()}
    out[CONF_MEMORY_BUDGET_MB] = int(out.get(CONF_MEMORY_BUDGET_MB, DEFAULT_MEMORY_BUDGET_MB))
    return {k: v for k, v in out.items() if v not in ("", None)}


class SaraiConfigFlow(ConfigFlow, domain=DOMAIN):
    """Handle a config flow for SARAi: the engine (files, budget, SOLAR) in the entry, assistants in sub-entries."""

    VERSION = 2
    MINOR_VERSION = 1

    def __init__(self) -> None:
        """Nothing chosen yet."""
        self._pending: dict[str, Any] = {}
        self._missing: list[str] = []
        self._install_task: asyncio.Task[list[str]] | None = None
        self._discovered: dict[str, Any] = {}

    def _create(self, data: dict[str, Any]) -> ConfigFlowResult:
        """The engine entry with its two assistants."""
        return self.async_create_entry(
            title="SARAi",
            data=data,
            subentries=[
                {
                    "subentry_type": SUBENTRY_CONVERSATION,
                    "data": default_agent_options(SUBENTRY_CONVERSATION),
                    "title": DEFAULT_CONVERSATION_NAME,
                    "unique_id": None,
                },
                {
                    "subentry_type": SUBENTRY_AI_TASK,
                    "data": default_agent_options(SUBENTRY_AI_TASK),
                    "title": DEFAULT_AI_TASK_NAME,
                    "unique_id": None,
                },
            ],
        )

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Where the model runs: in Home Assistant, in a worker process, or on a server."""
        await self.async_set_unique_id(DOMAIN)
        self._abort_if_unique_id_configured()
        return self.async_show_menu(step_id="user", menu_options=list(PLACEMENTS))

    async def async_step_in_process(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Model files, loaded in Home Assistant's own process."""
        return await self._async_step_files(PLACEMENT_IN_PROCESS, user_input)

    async def async_step_worker(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Model files, loaded in a supervised worker process (a crash there does not stop Home Assistant)."""
        return await self._async_step_files(PLACEMENT_WORKER, user_input)

    async def _async_step_files(self, placement: str, user_input: dict[str, Any] | None) -> ConfigFlowResult:
        errors: dict[str, str] = {}
        if user_input is not None:
            errors, _ = await validate_input(self.hass, user_input)
            if not errors:
                self._pending = {**_clean(user_input), CONF_PLACEMENT: placement}
                return await self._async_install_or_finish()
        return self.async_show_form(
            step_id=placement,
            data_schema=_user_schema(user_input or {}),
            errors=errors,
            description_placeholders=URL_EXAMPLE,
        )

    async def _async_install_or_finish(self) -> ConfigFlowResult:
        """Install what the model files need and is missing (llama-cpp-python; torch, torchvision and
        transformers for an Omni checkpoint), then create or update the entry."""
        omni = bool(self._pending.get(CONF_OMNI_MODEL))
        self._missing = await self.hass.async_add_executor_job(missing_requirements, omni)
        if self._missing:
            self._install_task = None
            return await self.async_step_install()
        return await self.async_step_finish()

    async def async_step_install(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """The packages are installed on demand (llama-cpp-python compiles for minutes where no wheel exists;
        PyTorch is a download of several hundred MB)."""
        if self._install_task is None:
            self._install_task = self.hass.async_create_task(
                install_requirements(self.hass, self._missing), eager_start=False
            )
        if not self._install_task.done():
            omni = any(req in OMNI_REQUIREMENTS for req in self._missing)
            return self.async_show_progress(
                step_id="install",
                progress_action="install_omni" if omni else "install_llama_cpp",
                progress_task=self._install_task,
                description_placeholders={"packages": package_names(self._missing)},
            )
        failed = self._install_task.cancelled() or self._install_task.exception() is not None
        self._missing = list(self._missing) if failed else self._install_task.result()
        return self.async_show_progress_done(next_step_id="install_failed" if self._missing else "finish")

    async def async_step_finish(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Everything is installed: create the entry (or, reconfiguring, update it)."""
        if self.source == SOURCE_RECONFIGURE:
            return self.async_update_and_abort(self._get_reconfigure_entry(), data=self._pending)
        return self._create(self._pending)

    async def async_step_install_failed(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """The install cannot work here (no compiler; musl, where PyTorch has no packages): point to the server
        placement and the add-on (without the Omni checkpoint, the GGUF files still run here)."""
        reason = "install_failed" if LLAMA_CPP_REQUIREMENT in self._missing else "install_omni_failed"
        return self.async_abort(reason=reason, description_placeholders={"packages": package_names(self._missing)})

    async def async_step_server(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """An OpenAI-compatible inference server: SARAi's engine server (add-on), llama-server or vLLM."""
        errors: dict[str, str] = {}
        if user_input is not None:
            data = _clean(user_input)
            errors = await _validate_server_form(self.hass, data)
            if not errors:
                return self._create({**data, CONF_PLACEMENT: PLACEMENT_SERVER})
        return self.async_show_form(
            step_id="server",
            data_schema=_server_schema(user_input or {}),
            errors=errors,
            description_placeholders=URL_EXAMPLE,
        )

    async def async_step_hassio(self, discovery_info: HassioServiceInfo) -> ConfigFlowResult:
        """The SARAi engine add-on announced itself through the Supervisor (again: a new key or port updates a
        server entry; an entry that runs the model elsewhere is left alone)."""
        config = discovery_info.config
        try:
            url = validate_url(f"http://{config['host']}:{int(config['port'])}/v1")
        except KeyError, TypeError, ValueError, InvalidInput:
            return self.async_abort(reason="invalid_discovery_info")
        await self.async_set_unique_id(DOMAIN)
        entries = self._async_current_entries(include_ignore=False)
        if entries and entries[0].data.get(CONF_PLACEMENT) == PLACEMENT_SERVER:
            self._abort_if_unique_id_configured(
                updates={CONF_SERVER_URL: url, CONF_SERVER_API_KEY: str(config.get("api_key") or "")}
            )
        self._abort_if_unique_id_configured()
        self._discovered = {
            CONF_SERVER_URL: url,
            CONF_SERVER_API_KEY: str(config.get("api_key") or ""),
            "addon": discovery_info.name,
        }
        self.context["title_placeholders"] = {"name": discovery_info.name}
        return await self.async_step_hassio_confirm()

    async def async_step_hassio_confirm(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Confirm the add-on as SARAi's inference server."""
        errors: dict[str, str] = {}
        url, key = self._discovered[CONF_SERVER_URL], self._discovered[CONF_SERVER_API_KEY] or None
        if user_input is not None:
            if problem := await _validate_server(self.hass, url, key):
                errors["base"] = problem[1]
            else:
                return self._create(
                    {
                        CONF_PLACEMENT: PLACEMENT_SERVER,
                        CONF_SERVER_URL: url,
                        CONF_SERVER_API_KEY: key or "",
                        CONF_MEMORY_BUDGET_MB: DEFAULT_MEMORY_BUDGET_MB,
                    }
                )
        return self.async_show_form(
            step_id="hassio_confirm",
            errors=errors,
            description_placeholders={"addon": self._discovered["addon"]},
        )

    async def async_step_reconfigure(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Change model paths, budget, the inference server or the SOLAR server (the placement stays)."""
        entry = self._get_reconfigure_entry()
        placement = entry.data.get(CONF_PLACEMENT, PLACEMENT_IN_PROCESS)
        errors: dict[str, str] = {}
        if user_input is not None:
            if placement == PLACEMENT_SERVER:
                errors = await _validate_server_form(self.hass, _clean(user_input))
            else:
                errors, _ = await validate_input(self.hass, user_input)
            if not errors:
                self._pending = {**_clean(user_input), CONF_PLACEMENT: placement}
                if placement == PLACEMENT_SERVER:
                    return await self.async_step_finish()
                return await self._async_install_or_finish()
        schema = _server_schema if placement == PLACEMENT_SERVER else _user_schema
        return self.async_show_form(
            step_id="reconfigure",
            data_schema=schema(user_input or entry.data),
            errors=errors,
            description_placeholders=URL_EXAMPLE,
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
            if problem := await _validate_solar(self.hass, entry.data[CONF_SOLAR_URL], key):
                errors["base"] = problem[1]
            else:
                return self.async_update_and_abort(entry, data_updates={CONF_SOLAR_API_KEY: key or ""})
        return self.async_show_form(
            step_id="reauth_confirm",
            data_schema=vol.Schema(
                {vol.Optional(CONF_SOLAR_API_KEY): TextSelector(TextSelectorConfig(type=TextSelectorType.PASSWORD))}
            ),
            errors=errors,
            description_placeholders={"url": redact_url(entry.data.get(CONF_SOLAR_URL, ""))},
        )

    @classmethod
    @callback
    def async_get_supported_subentry_types(cls, config_entry: ConfigEntry) -> dict[str, type[ConfigSubentryFlow]]:
        """Assistants (conversation agents, AI Task agents) and camera analyses are sub-entries."""
        return {
            SUBENTRY_CONVERSATION: AgentSubentryFlow,
            SUBENTRY_AI_TASK: AgentSubentryFlow,
            SUBENTRY_CAMERA: CameraSubentryFlow,
        }

    @staticmethod
    @callback
    def async_get_options_flow(config_entry: ConfigEntry) -> OptionsFlow:
        """Engine options: context, threads, warm-up, idle unload, SOLAR timeout, voice, int8."""
        return SaraiOptionsFlow()


class SaraiOptionsFlow(OptionsFlow):
    """The engine's options (the assistants' settings are in their sub-entries); saving reloads SARAi."""

    async def async_step_init(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Show and save the options."""
        if user_input is not None:
            return self.async_create_entry(data=user_input)
        options = self.config_entry.options
        schema = vol.Schema(
            {
                vol.Optional(
                    CONF_CONTEXT_SIZE, default=options.get(CONF_CONTEXT_SIZE, DEFAULT_CONTEXT_SIZE)
                ): NumberSelector(NumberSelectorConfig(min=512, max=131072, step=256, mode=NumberSelectorMode.BOX)),
                vol.Optional(CONF_THREADS, default=options.get(CONF_THREADS, 0)): NumberSelector(
                    NumberSelectorConfig(min=0, max=256, step=1, mode=NumberSelectorMode.BOX)
                ),
                vol.Optional(CONF_WARMUP, default=options.get(CONF_WARMUP, DEFAULT_WARMUP)): BooleanSelector(),
                vol.Optional(
                    CONF_IDLE_UNLOAD_MINUTES, default=options.get(CONF_IDLE_UNLOAD_MINUTES, DEFAULT_IDLE_UNLOAD_MINUTES)
                ): NumberSelector(NumberSelectorConfig(min=0, max=1440, step=1, mode=NumberSelectorMode.BOX)),
                vol.Optional(
                    CONF_ROUTING_MODE,
                    default=options.get(
                        CONF_ROUTING_MODE, "auto" if self.config_entry.data.get(CONF_SOLAR_URL) else "local"
                    ),
                ): SelectSelector(
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


def default_agent_options(subentry_type: str) -> dict[str, Any]:
    """A new assistant's settings (the AI Task agent answers with less randomness)."""
    options: dict[str, Any] = {
        CONF_TEMPERATURE: DEFAULT_TEMPERATURE,
        CONF_MAX_TOKENS: DEFAULT_MAX_TOKENS,
        CONF_HISTORY_TURNS: DEFAULT_HISTORY_TURNS,
    }
    if subentry_type == SUBENTRY_CONVERSATION:
        options.update({CONF_PROMPT: DEFAULT_PROMPT, CONF_LLM_HASS_API: [llm.LLM_API_ASSIST]})
    else:
        options[CONF_TEMPERATURE] = DEFAULT_AI_TASK_TEMPERATURE
    return options


class AgentSubentryFlow(ConfigSubentryFlow):
    """Add or change an assistant: a conversation agent or an AI Task agent, on the shared engine."""

    @property
    def _is_conversation(self) -> bool:
        return self._subentry_type == SUBENTRY_CONVERSATION

    def _schema(self, name: str | None, options: Mapping[str, Any]) -> vol.Schema:
        entry = self._get_entry()
        fields: dict[Any, Any] = {}
        if name is not None:
            fields[vol.Required(CONF_NAME, default=name)] = str
        if self._is_conversation:
            apis = [SelectOptionDict(label=api.name, value=api.id) for api in llm.async_get_apis(self.hass)]
            fields[vol.Optional(CONF_PROMPT, description={"suggested_value": options.get(CONF_PROMPT)})] = (
                TemplateSelector()
            )
            fields[vol.Optional(CONF_LLM_HASS_API, description={"suggested_value": options.get(CONF_LLM_HASS_API)})] = (
                SelectSelector(SelectSelectorConfig(options=apis, multiple=True))
            )
        fields[vol.Optional(CONF_TEMPERATURE, default=options.get(CONF_TEMPERATURE, DEFAULT_TEMPERATURE))] = (
            NumberSelector(NumberSelectorConfig(min=0, max=2, step=0.05))
        )
        fields[vol.Optional(CONF_MAX_TOKENS, default=options.get(CONF_MAX_TOKENS, DEFAULT_MAX_TOKENS))] = (
            NumberSelector(NumberSelectorConfig(min=16, max=8192, step=1, mode=NumberSelectorMode.BOX))
        )
        default_mode = "auto" if entry.data.get(CONF_SOLAR_URL) else "local"
        fields[vol.Optional(CONF_ROUTING_MODE, default=options.get(CONF_ROUTING_MODE, default_mode))] = SelectSelector(
            SelectSelectorConfig(
                options=ROUTING_MODES, translation_key=CONF_ROUTING_MODE, mode=SelectSelectorMode.DROPDOWN
            )
        )
        if self._is_conversation:
            fields[vol.Optional(CONF_HISTORY_TURNS, default=options.get(CONF_HISTORY_TURNS, DEFAULT_HISTORY_TURNS))] = (
                NumberSelector(NumberSelectorConfig(min=0, max=500, step=1, mode=NumberSelectorMode.BOX))
            )
        return vol.Schema(fields)

    @staticmethod
    def _options(user_input: Mapping[str, Any]) -> dict[str, Any]:
        options = {k: v for k, v in user_input.items() if k != CONF_NAME}
        for key in (CONF_MAX_TOKENS, CONF_HISTORY_TURNS):
            if key in options:
                options[key] = int(options[key])
        return options

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> SubentryFlowResult:
        """A new assistant: its name and settings."""
        if self._get_entry().state is not ConfigEntryState.LOADED:
            return self.async_abort(reason="entry_not_loaded")
        if user_input is not None:
            return self.async_create_entry(title=user_input[CONF_NAME], data=self._options(user_input))
        name = DEFAULT_CONVERSATION_NAME if self._is_conversation else DEFAULT_AI_TASK_NAME
        return self.async_show_form(
            step_id="user", data_schema=self._schema(name, default_agent_options(self._subentry_type))
        )

    async def async_step_reconfigure(self, user_input: dict[str, Any] | None = None) -> SubentryFlowResult:
        """Change an assistant's settings (its name stays: rename the device or entity instead)."""
        if self._get_entry().state is not ConfigEntryState.LOADED:
            return self.async_abort(reason="entry_not_loaded")
        subentry = self._get_reconfigure_subentry()
        if user_input is not None:
            return self.async_update_and_abort(self._get_entry(), subentry, data=self._options(user_input))
        return self.async_show_form(step_id="reconfigure", data_schema=self._schema(None, subentry.data))


def _camera_schema(defaults: Mapping[str, Any], default_prompt: str) -> vol.Schema:
    return vol.Schema(
        {
            vol.Required(CONF_CAMERA_ENTITY, default=defaults.get(CONF_CAMERA_ENTITY, vol.UNDEFINED)): EntitySelector(
                EntitySelectorConfig(domain="camera")
            ),
            vol.Required(CONF_PROMPT, default=defaults.get(CONF_PROMPT, default_prompt)): TextSelector(
                TextSelectorConfig(multiline=True)
            ),
            vol.Required(
                CONF_SCAN_INTERVAL_MINUTES, default=defaults.get(CONF_SCAN_INTERVAL_MINUTES, 0)
            ): NumberSelector(NumberSelectorConfig(min=0, max=1440, step=1, mode=NumberSelectorMode.BOX)),
        }
    )


class CameraSubentryFlow(ConfigSubentryFlow):
    """Add or change a camera analysis (camera + question + optional interval)."""

    def _default_prompt(self) -> str:
        language = (self.hass.config.language or "en").split("-")[0].lower()
        return DEFAULT_CAMERA_PROMPTS.get(language, DEFAULT_CAMERA_PROMPTS["en"])

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> SubentryFlowResult:
        """Pick a camera and a question."""
        entry = self._get_entry()
        errors: dict[str, str] = {}
        if user_input is not None:
            if error := self._check(user_input):
                errors[CONF_SCAN_INTERVAL_MINUTES] = error
            elif any(
                s.data.get(CONF_CAMERA_ENTITY) == user_input[CONF_CAMERA_ENTITY]
                and s.data.get(CONF_PROMPT) == str(user_input[CONF_PROMPT]).strip()
                for s in entry.subentries.values()
            ):
                return self.async_abort(reason="already_configured")
            else:
                return self.async_create_entry(title=self._title(user_input), data=self._data(user_input))
        return self.async_show_form(
            step_id="user", data_schema=_camera_schema(user_input or {}, self._default_prompt()), errors=errors
        )

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
            step_id="reconfigure",
            data_schema=_camera_schema(user_input or subentry.data, self._default_prompt()),
            errors=errors,
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
        """The camera's name (the analysis entity adds its translated name: "Front door Analysis")."""
        state = self.hass.states.get(user_input[CONF_CAMERA_ENTITY])
        return state.name if state is not None else str(user_input[CONF_CAMERA_ENTITY])
