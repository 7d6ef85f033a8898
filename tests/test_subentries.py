"""Assistants and camera analyses as sub-entries: one device each, nothing else moves when one is added or
removed; several assistants on one engine; migration of a version-1 entry."""

from __future__ import annotations

from typing import Any

from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntryState, ConfigSubentry, ConfigSubentryData
from homeassistant.core import Context, HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import device_registry as dr, entity_registry as er
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry, async_capture_events

from custom_components.sarai.const import DOMAIN
from tests.common import setup_entry, start_flow

pytestmark = pytest.mark.usefixtures("ha_core")

ENGINE_ENTITIES = {
    "sensor.sarai_engine_state",
    "sensor.sarai_memory_in_use",
    "sensor.sarai_last_route",
    "sensor.sarai_last_turn_latency",
    "stt.sarai_speech_to_text",
    "tts.sarai_text_to_speech",
}
AGENTS = {"conversation.sarai", "ai_task.sarai_ai_task"}


def _entities(hass: HomeAssistant, entry: MockConfigEntry) -> dict[str, er.RegistryEntry]:
    return {e.entity_id: e for e in er.async_entries_for_config_entry(er.async_get(hass), entry.entry_id)}


def _snapshot(hass: HomeAssistant, entry: MockConfigEntry) -> dict[str, tuple[str, str | None, str | None]]:
    """entity_id -> (unique_id, device_id, config_subentry_id), and every entity has a state."""
    out = {}
    for entity_id, reg in _entities(hass, entry).items():
        assert hass.states.get(entity_id) is not None, entity_id
        out[entity_id] = (reg.unique_id, reg.device_id, reg.config_subentry_id)
    return out


async def _add_camera(hass: HomeAssistant, entry: MockConfigEntry, prompt: str) -> str:
    flow = await hass.config_entries.subentries.async_init((entry.entry_id, "camera"), context={"source": "user"})
    done = await hass.config_entries.subentries.async_configure(
        flow["flow_id"], {"camera_entity": "camera.front_door", "prompt": prompt, "scan_interval_minutes": 0}
    )
    assert done["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    return next(s for s in entry.subentries.values() if s.data.get("prompt") == prompt).subentry_id


async def test_camera_analyses_leave_every_other_entity_alone(
    hass: HomeAssistant, make_entry, omni_path: str, front_door, caplog: pytest.LogCaptureFixture
) -> None:
    """Adding, removing and reloading camera analyses: the engine's and the assistants' entities stay, on their
    own devices; N analyses give N entities, each bound to its sub-entry with its own device."""
    entry = make_entry({"omni_model": omni_path})
    await setup_entry(hass, entry)
    before = _snapshot(hass, entry)
    assert set(before) == ENGINE_ENTITIES | AGENTS
    dev_reg = dr.async_get(hass)
    engine_device = dev_reg.async_get_device_by_identifier((DOMAIN, entry.entry_id), entry.entry_id)
    assert engine_device is not None
    for entity_id in ENGINE_ENTITIES:
        assert before[entity_id][1] == engine_device.id and before[entity_id][2] is None

    first = await _add_camera(hass, entry, "¿Hay alguien?")
    second = await _add_camera(hass, entry, "¿Hay un paquete?")
    after = _snapshot(hass, entry)
    assert {k: v for k, v in after.items() if k in before} == before
    cameras = {k: v for k, v in after.items() if k.startswith("image_processing.")}
    assert len(cameras) == 2, cameras
    assert {v[2] for v in cameras.values()} == {first, second}
    assert {v[0] for v in cameras.values()} == {first, second}
    for _unique_id, device_id, subentry_id in cameras.values():
        device = dev_reg.async_get(device_id)
        assert device is not None and (DOMAIN, subentry_id) in device.identifiers
        assert device.config_entry_id == entry.entry_id and device.config_subentry_id == subentry_id
    engine_device = dev_reg.async_get_device_by_identifier((DOMAIN, entry.entry_id), entry.entry_id)
    assert engine_device.config_subentry_id is None
    assert "assigns an existing device to a different config subentry" not in caplog.text

    # Conversation still works (the agent was not lost).
    result = await conversation.async_converse(hass, "hola", None, Context(), agent_id="conversation.sarai")
    assert result.response.response_type.value != "error"

    # Reload, then unload/setup: the same set.
    assert await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    assert _snapshot(hass, entry) == after
    assert await hass.config_entries.async_unload(entry.entry_id)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert _snapshot(hass, entry) == after

    # Removing one analysis removes its entity and device only.
    assert hass.config_entries.async_remove_subentry(entry, first)
    await hass.async_block_till_done()
    remaining = _snapshot(hass, entry)
    assert set(remaining) == set(after) - {k for k, v in cameras.items() if v[2] == first}
    assert {k: v for k, v in remaining.items()} == {k: after[k] for k in remaining}
    assert dev_reg.async_get_device_by_identifier((DOMAIN, first), entry.entry_id) is None
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_two_assistants_one_engine(hass: HomeAssistant, make_entry) -> None:
    """Two conversation agents with different instructions answer differently from the same model, loaded once;
    each has its own device; the route names the agent; removing one leaves every other entity untouched."""
    entry = make_entry(options={"llm_hass_api": [], "max_tokens": 16})
    await setup_entry(hass, entry)
    flow = await hass.config_entries.subentries.async_init((entry.entry_id, "conversation"), context={"source": "user"})
    assert flow["type"] is FlowResultType.FORM
    done = await hass.config_entries.subentries.async_configure(
        flow["flow_id"],
        {
            "name": "Niños",
            "prompt": "Eres un asistente amable para niños. Habla despacio y con cariño, sin controlar la casa.",
            "llm_hass_api": [],
            "temperature": 0,
            "max_tokens": 16,
            "routing_mode": "local",
            "history_turns": 4,
        },
    )
    assert done["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    ninos = next(s for s in entry.subentries.values() if s.title == "Niños")
    assert ninos.data["history_turns"] == 4 and "name" not in ninos.data
    ent_reg = er.async_get(hass)
    ninos_id = ent_reg.async_get_entity_id("conversation", DOMAIN, ninos.subentry_id)
    assert ninos_id == "conversation.ninos"
    assert ent_reg.async_get(ninos_id).config_subentry_id == ninos.subentry_id
    device = dr.async_get(hass).async_get(ent_reg.async_get(ninos_id).device_id)
    assert device.name == "Niños" and device.entry_type is dr.DeviceEntryType.SERVICE

    routes = async_capture_events(hass, "sarai_route")
    answers = {}
    for agent_id in ("conversation.sarai", ninos_id):
        result = await conversation.async_converse(hass, "¿Quién eres?", None, Context(), agent_id=agent_id)
        answers[agent_id] = result.response.speech["plain"]["speech"]
    engine = entry.runtime_data.engine
    assert engine.text.loads == 1
    prompts = [r.data["agent"] for r in routes]
    assert prompts == ["SARAi", "Niños"]
    assert answers["conversation.sarai"] != answers[ninos_id]
    assert hass.states.get("sensor.sarai_last_route").attributes["agent"] == "Niños"

    before = _snapshot(hass, entry)
    assert hass.config_entries.async_remove_subentry(entry, ninos.subentry_id)
    await hass.async_block_till_done()
    after = _snapshot(hass, entry)
    assert after == {k: v for k, v in before.items() if k != ninos_id}
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_assistant_subentry_flows(hass: HomeAssistant, make_entry) -> None:
    """AI Task agents are added and reconfigured; while SARAi is not loaded, the flows abort."""
    entry = make_entry(options={"llm_hass_api": []})
    await setup_entry(hass, entry)
    flow = await hass.config_entries.subentries.async_init((entry.entry_id, "ai_task_data"), context={"source": "user"})
    assert "llm_hass_api" not in {str(k) for k in flow["data_schema"].schema}
    done = await hass.config_entries.subentries.async_configure(
        flow["flow_id"], {"name": "Resumen", "temperature": 0.1, "max_tokens": 64, "routing_mode": "local"}
    )
    assert done["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    assert hass.states.get("ai_task.resumen") is not None
    resumen = next(s for s in entry.subentries.values() if s.title == "Resumen")
    conv = next(s for s in entry.subentries.values() if s.subentry_type == "conversation")

    flow = await entry.start_subentry_reconfigure_flow(hass, conv.subentry_id)
    assert flow["step_id"] == "reconfigure"
    done = await hass.config_entries.subentries.async_configure(
        flow["flow_id"],
        {"prompt": "Sé breve.", "llm_hass_api": ["assist"], "temperature": 0.3, "max_tokens": 40, "history_turns": 2},
    )
    assert done["reason"] == "reconfigure_successful"
    await hass.async_block_till_done()
    assert entry.subentries[conv.subentry_id].data["prompt"] == "Sé breve."
    assert entry.subentries[conv.subentry_id].title == "SARAi"

    assert await hass.config_entries.async_unload(entry.entry_id)
    for subentry_type in ("conversation", "ai_task_data"):
        flow = await hass.config_entries.subentries.async_init(
            (entry.entry_id, subentry_type), context={"source": "user"}
        )
        assert flow["type"] is FlowResultType.ABORT and flow["reason"] == "entry_not_loaded"
    flow = await entry.start_subentry_reconfigure_flow(hass, resumen.subentry_id)
    assert flow["type"] is FlowResultType.ABORT and flow["reason"] == "entry_not_loaded"


async def test_migration_from_version_1(hass: HomeAssistant, gguf_path: str, omni_path: str) -> None:
    """A version-1 entry (one assistant in the options) becomes version 2: its options move into a conversation
    and an AI Task sub-entry, and the entities keep their entity ids."""
    v1_options = {
        "prompt": "Eres la casa.",
        "llm_hass_api": [],
        "temperature": 0.0,
        "max_tokens": 24,
        "routing_mode": "local",
        "context_size": 4096,
        "voice": "Ethan",
        "warmup": False,
    }
    entry = MockConfigEntry(
        domain=DOMAIN,
        title="SARAi",
        unique_id=DOMAIN,
        version=1,
        data={"gguf_model": gguf_path, "omni_model": omni_path, "memory_budget_mb": 12000},
        options=v1_options,
        subentries_data=[
            ConfigSubentryData(
                data={"camera_entity": "camera.front_door", "prompt": "q", "scan_interval_minutes": 0},
                subentry_type="camera",
                title="Front door analysis",
                unique_id=None,
            )
        ],
    )
    entry.add_to_hass(hass)
    ent_reg = er.async_get(hass)
    old_conversation = ent_reg.async_get_or_create(
        "conversation", DOMAIN, f"{entry.entry_id}_conversation", config_entry=entry, suggested_object_id="sarai"
    )
    old_ai_task = ent_reg.async_get_or_create(
        "ai_task", DOMAIN, f"{entry.entry_id}_ai_task", config_entry=entry, suggested_object_id="sarai_ai_task"
    )
    camera_sub = next(iter(entry.subentries.values()))
    old_camera = ent_reg.async_get_or_create(
        "image_processing",
        DOMAIN,
        f"{entry.entry_id}_camera_{camera_sub.subentry_id}",
        config_entry=entry,
        suggested_object_id="sarai_front_door_analysis",
    )
    # Version 1's bug: adding a camera analysis moved the engine's device to that sub-entry.
    dev_reg = dr.async_get(hass)
    moved = dev_reg.async_get_or_create(
        config_entry_id=entry.entry_id,
        config_subentry_id=camera_sub.subentry_id,
        identifiers={(DOMAIN, entry.entry_id)},
        name="SARAi",
    )
    assert moved.config_subentry_id == camera_sub.subentry_id
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert entry.version == 2
    assert dev_reg.async_get(moved.id).config_subentry_id is None
    assert entry.options == {"routing_mode": "local", "context_size": 4096, "voice": "Ethan", "warmup": False}
    by_type: dict[str, ConfigSubentry] = {s.subentry_type: s for s in entry.subentries.values()}
    assert set(by_type) == {"conversation", "ai_task_data", "camera"}
    for subentry_type in ("conversation", "ai_task_data"):
        assert dict(by_type[subentry_type].data) == {
            "prompt": "Eres la casa.",
            "llm_hass_api": [],
            "temperature": 0.0,
            "max_tokens": 24,
            "routing_mode": "local",
        }
    conversation_entry = ent_reg.async_get(old_conversation.entity_id)
    assert conversation_entry.unique_id == by_type["conversation"].subentry_id
    assert conversation_entry.config_subentry_id == by_type["conversation"].subentry_id
    assert ent_reg.async_get(old_ai_task.entity_id).unique_id == by_type["ai_task_data"].subentry_id
    camera_entry = ent_reg.async_get(old_camera.entity_id)
    assert camera_entry.unique_id == camera_sub.subentry_id
    assert camera_entry.config_subentry_id == camera_sub.subentry_id
    for entity_id in (old_conversation.entity_id, old_ai_task.entity_id, old_camera.entity_id):
        assert hass.states.get(entity_id) is not None, entity_id
    assert old_conversation.entity_id == "conversation.sarai"
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_a_newer_entry_is_not_downgraded(hass: HomeAssistant, gguf_path: str) -> None:
    """An entry from a newer SARAi (version 3) is refused, not misread."""
    entry = MockConfigEntry(domain=DOMAIN, unique_id=DOMAIN, version=3, data={"gguf_model": gguf_path})
    entry.add_to_hass(hass)
    assert not await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.MIGRATION_ERROR


async def test_new_entry_has_its_assistants(hass: HomeAssistant, gguf_path: str) -> None:
    """The config flow creates the engine entry with one conversation and one AI Task agent."""

    flow = await start_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        flow["flow_id"], {"gguf_model": gguf_path, "memory_budget_mb": 12000}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    entry = hass.config_entries.async_entries(DOMAIN)[0]
    assert entry.version == 2
    kinds: dict[str, Any] = {s.subentry_type: s for s in entry.subentries.values()}
    assert set(kinds) == {"conversation", "ai_task_data"}
    assert kinds["conversation"].data["llm_hass_api"] == ["assist"]
    assert hass.states.get("conversation.sarai") is not None
    assert hass.states.get("ai_task.sarai_ai_task") is not None
    assert await hass.config_entries.async_unload(entry.entry_id)
