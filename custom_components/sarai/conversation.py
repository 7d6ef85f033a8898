"""Conversation agent: Qwen2.5-Omni (local GGUF) or SOLAR, with Home Assistant's tools."""

from __future__ import annotations

from typing import Literal

from homeassistant.components import conversation
from homeassistant.components.conversation.models import AbstractConversationAgent
from homeassistant.const import MATCH_ALL
from homeassistant.core import HomeAssistant
from homeassistant.helpers import llm
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from . import SaraiConfigEntry
from .const import CONF_LLM_HASS_API, CONF_PROMPT, DEFAULT_PROMPT, DOMAIN, EVENT_ROUTE
from .engine import RouteInfo
from .entity import SaraiLLMEntity

PARALLEL_UPDATES = 0


async def async_setup_entry(
    hass: HomeAssistant, entry: SaraiConfigEntry, async_add_entities: AddConfigEntryEntitiesCallback
) -> None:
    """Add the conversation agent."""
    async_add_entities([SaraiConversationEntity(entry)])


class SaraiConversationEntity(conversation.ConversationEntity, AbstractConversationAgent, SaraiLLMEntity):
    """SARAi as an Assist conversation agent."""

    _attr_name = None
    _attr_supports_streaming = True

    def __init__(self, entry: SaraiConfigEntry) -> None:
        """Create the agent."""
        SaraiLLMEntity.__init__(self, entry, "conversation")
        if entry.options.get(CONF_LLM_HASS_API, [llm.LLM_API_ASSIST]):
            self._attr_supported_features = conversation.ConversationEntityFeature.CONTROL

    @property
    def supported_languages(self) -> list[str] | Literal["*"]:
        """Qwen2.5-Omni is multilingual."""
        return MATCH_ALL

    async def async_added_to_hass(self) -> None:
        """Register as agent."""
        await super().async_added_to_hass()
        conversation.async_set_agent(self.hass, self.entry, self)

    async def async_will_remove_from_hass(self) -> None:
        """Unregister."""
        conversation.async_unset_agent(self.hass, self.entry)
        await super().async_will_remove_from_hass()

    async def _async_handle_message(
        self, user_input: conversation.ConversationInput, chat_log: conversation.ChatLog
    ) -> conversation.ConversationResult:
        """Answer one turn."""
        options = self.entry.options
        try:
            await chat_log.async_provide_llm_data(
                user_input.as_llm_context(DOMAIN),
                options.get(CONF_LLM_HASS_API, [llm.LLM_API_ASSIST]) or None,
                options.get(CONF_PROMPT, DEFAULT_PROMPT),
                user_input.extra_system_prompt,
            )
        except conversation.ConverseError as err:
            return err.as_conversation_result()
        decision = self.engine.decide(user_input.text)
        route = RouteInfo(route=decision.route, reason=decision.reason)
        await self.async_handle_chat_log(chat_log, route)
        result = conversation.async_get_result_from_chat_log(user_input, chat_log)
        chat_log.async_trace({"sarai_route": route.as_dict()})
        self.hass.bus.async_fire(EVENT_ROUTE, route.as_dict())
        return result
