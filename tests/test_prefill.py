"""The prompt cache through Home Assistant: warm-up prefills each assistant's static prompt (and its state is
kept on disk), so a new conversation evaluates only the user's words; removing SARAi deletes the states."""

from __future__ import annotations

from pathlib import Path

from homeassistant.components import conversation
from homeassistant.core import Context, HomeAssistant
import pytest

from custom_components.sarai import prompt_cache_dir
from tests.common import setup_entry

pytestmark = pytest.mark.usefixtures("ha_core")


async def test_warmup_prefills_each_assistant(hass: HomeAssistant, make_entry) -> None:
    """With warm-up on: the model loads and the assistant's system prompt + tools are evaluated before any
    turn; the first voice turn then evaluates only the user turn; the state survives a reload (disk)."""
    entry = make_entry(options={"warmup": True, "llm_hass_api": ["assist"], "max_tokens": 8})
    await setup_entry(hass, entry)
    await hass.async_block_till_done(wait_background_tasks=True)
    text = entry.runtime_data.engine.text
    assert text.loaded and text.last_prefill_tokens > 100
    cache_dir = Path(prompt_cache_dir(hass, entry))
    assert any(cache_dir.iterdir())  # the prefix state is on disk

    await conversation.async_converse(hass, "hola", None, Context(), agent_id="conversation.sarai")
    assert text.last_evaluated_tokens <= 32, (text.last_evaluated_tokens, len(text.last_prompt_tokens))
    assert text.last_reused_tokens > 100

    # A reload (new process state, same files): restored from disk, the first turn is the user turn again.
    assert await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done(wait_background_tasks=True)
    text = entry.runtime_data.engine.text
    await conversation.async_converse(hass, "buenas noches", None, Context(), agent_id="conversation.sarai")
    assert text.last_evaluated_tokens <= 32

    diag = text.cache_status()
    assert diag["last_evaluated_tokens"] == text.last_evaluated_tokens
    assert await hass.config_entries.async_remove(entry.entry_id)
    await hass.async_block_till_done()
    assert not cache_dir.exists() or not any(p.name.endswith(".state") for p in cache_dir.iterdir())


async def test_prefill_follows_exposed_entities(hass: HomeAssistant, make_entry) -> None:
    """Exposing an entity changes the Assist prompt: the assistant prefills again (debounced)."""
    from datetime import timedelta

    from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
    from homeassistant.setup import async_setup_component
    from homeassistant.util import dt as dt_util
    from pytest_homeassistant_custom_component.common import async_fire_time_changed

    assert await async_setup_component(hass, "input_boolean", {"input_boolean": {"porch": {"name": "Porch"}}})
    entry = make_entry(options={"warmup": True, "llm_hass_api": ["assist"], "max_tokens": 8})
    await setup_entry(hass, entry)
    await hass.async_block_till_done(wait_background_tasks=True)
    text = entry.runtime_data.engine.text
    before = text.last_prefill_tokens
    async_expose_entity(hass, conversation.DOMAIN, "input_boolean.porch", True)
    async_fire_time_changed(hass, dt_util.utcnow() + timedelta(seconds=11))
    await hass.async_block_till_done(wait_background_tasks=True)
    assert text.last_prefill_tokens > before
    assert await hass.config_entries.async_remove(entry.entry_id)  # also deletes the prompt states
