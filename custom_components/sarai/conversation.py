"""Conversation agents: one per ``conversation`` sub-entry, all on the one shared engine."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from homeassistant.components import conversation
from homeassistant.components.homeassistant.exposed_entities import async_listen_entity_updates
from homeassistant.config_entries import ConfigSubentry
from homeassistant.const import MATCH_ALL
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import chat_session
from homeassistant.helpers.debounce import Debouncer
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from . import SaraiConfigEntry
from .const import CONF_LLM_HASS_API, CONF_PROMPT, CONF_WARMUP, DEFAULT_PROMPT, DOMAIN, LOGGER, SUBENTRY_CONVERSATION
from .engine import ChatRequest
from .entity import SaraiLLMEntity

PARALLEL_UPDATES = 0
PREFILL_COOLDOWN_S = 10.0  # exposed entities change in bursts: prefill once they settle


async def async_setup_entry(
    hass: HomeAssistant, entry: SaraiConfigEntry, async_add_entities: AddConfigEntryEntitiesCallback
) -> None:
    """Add one conversation agent per conversation sub-entry."""
    for subentry in entry.subentries.values():
        if subentry.subentry_type == SUBENTRY_CONVERSATION:
            async_add_entities([SaraiConversationEntity(entry, subentry)], config_subentry_id=subentry.subentry_id)


class SaraiConversationEntity(conversation.ConversationEntity, SaraiLLMEntity):
    """A SARAi assistant as an Assist conversation agent."""

    _attr_supports_streaming = True

    def __init__(self, entry: SaraiConfigEntry, subentry: ConfigSubentry) -> None:
        """Create the agent of one sub-entry."""
        SaraiLLMEntity.__init__(self, entry, subentry, "Conversation agent")
        if subentry.data.get(CONF_LLM_HASS_API):
            self._attr_supported_features = conversation.ConversationEntityFeature.CONTROL

    @property
    def supported_languages(self) -> list[str] | Literal["*"]:
        """Qwen2.5-Omni is multilingual."""
        return MATCH_ALL

    async def async_added_to_hass(self) -> None:
        """With warm-up on, evaluate this assistant's static prompt ahead of the first turn, and again (debounced)
        when the exposed entities change, so that a new voice conversation evaluates only the user's words."""
        await super().async_added_to_hass()
        if not self.entry.options.get(CONF_WARMUP):
            return
        debouncer = Debouncer(self.hass, LOGGER, cooldown=PREFILL_COOLDOWN_S, immediate=False, function=self._prefill)
        self.async_on_remove(debouncer.async_shutdown)
        if self.subentry.data.get(CONF_LLM_HASS_API):
            self.async_on_remove(
                async_listen_entity_updates(self.hass, conversation.DOMAIN, debouncer.async_schedule_call)
            )
        self.entry.async_create_background_task(self.hass, self._prefill(), f"sarai prefill {self.entity_id}")

    async def _prefill(self) -> None:
        """Prefill this assistant's static prompt (and load the model first)."""
        if (request := await self.async_static_request()) is not None:
            await self.engine.warmup(prefill=request)

    async def async_static_request(self) -> ChatRequest | None:
        """This assistant's system prompt and tools for an empty conversation, built exactly as a turn builds
        them (None when its LLM API cannot be used now)."""
        user_input = conversation.ConversationInput(
            text="",
            context=Context(),
            conversation_id=None,
            device_id=None,
            satellite_id=None,
            language=self.hass.config.language,
            agent_id=self.entity_id,
        )
        with (
            chat_session.async_get_chat_session(self.hass) as session,
            conversation.async_get_chat_log(self.hass, session) as chat_log,
        ):
            try:
                await self._provide_llm_data(user_input, chat_log)
            except conversation.ConverseError as err:
                LOGGER.debug("No static prompt for %s: %s", self.entity_id, err)
                return None
            request = self.chat_request(chat_log)
        return replace(request, messages=[m for m in request.messages if m.role == "system"])

    async def _provide_llm_data(
        self, user_input: conversation.ConversationInput, chat_log: conversation.ChatLog
    ) -> None:
        options = self.subentry.data
        await chat_log.async_provide_llm_data(
            user_input.as_llm_context(DOMAIN),
            options.get(CONF_LLM_HASS_API) or None,
            options.get(CONF_PROMPT, DEFAULT_PROMPT),
            user_input.extra_system_prompt,
        )

    async def _async_handle_message(
        self, user_input: conversation.ConversationInput, chat_log: conversation.ChatLog
    ) -> conversation.ConversationResult:
        """Answer one turn."""
        try:
            await self._provide_llm_data(user_input, chat_log)
        except conversation.ConverseError as err:
            return err.as_conversation_result()
        await self.async_handle_chat_log(chat_log)
        return conversation.async_get_result_from_chat_log(user_input, chat_log)
