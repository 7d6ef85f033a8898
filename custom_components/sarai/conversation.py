"""Conversation agents: one per ``conversation`` sub-entry, all on the one shared engine."""

from __future__ import annotations

from typing import Literal

from homeassistant.components import conversation
from homeassistant.config_entries import ConfigSubentry
from homeassistant.const import MATCH_ALL
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from . import SaraiConfigEntry
from .const import CONF_LLM_HASS_API, CONF_PROMPT, DEFAULT_PROMPT, DOMAIN, SUBENTRY_CONVERSATION
from .entity import SaraiLLMEntity

PARALLEL_UPDATES = 0


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

    async def _async_handle_message(
        self, user_input: conversation.ConversationInput, chat_log: conversation.ChatLog
    ) -> conversation.ConversationResult:
        """Answer one turn."""
        options = self.subentry.data
        try:
            await chat_log.async_provide_llm_data(
                user_input.as_llm_context(DOMAIN),
                options.get(CONF_LLM_HASS_API) or None,
                options.get(CONF_PROMPT, DEFAULT_PROMPT),
                user_input.extra_system_prompt,
            )
        except conversation.ConverseError as err:
            return err.as_conversation_result()
        await self.async_handle_chat_log(chat_log)
        return conversation.async_get_result_from_chat_log(user_input, chat_log)
