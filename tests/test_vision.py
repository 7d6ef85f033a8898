"""Seeing: camera analyses (image_processing from subentries), AI Task with attachments, video events."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from homeassistant.components import ai_task
from homeassistant.config_entries import ConfigEntryState, ConfigSubentryData
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.setup import async_setup_component
import probatio as vol
import pytest
from pytest_homeassistant_custom_component.common import async_capture_events

from custom_components.sarai.const import DOMAIN
from tests.common import setup_entry as _setup, speech_metadata

pytestmark = pytest.mark.usefixtures("ha_core")


def _events_json(*events: dict[str, Any]) -> str:
    import json

    return json.dumps({"events": list(events)})


async def test_camera_subentry_scan_and_unload(hass: HomeAssistant, make_entry, omni_path: str, front_door) -> None:
    """A camera subentry made through its flow creates an entity; scan answers and fires an event; unload removes it."""
    entry = make_entry({"omni_model": omni_path})
    await _setup(hass, entry)
    result = await hass.config_entries.subentries.async_init((entry.entry_id, "camera"), context={"source": "user"})
    assert result["type"] is FlowResultType.FORM
    bad = await hass.config_entries.subentries.async_configure(
        result["flow_id"],
        {"camera_entity": "camera.front_door", "prompt": "¿Hay alguien?", "scan_interval_minutes": 0.5},
    )
    assert bad.get("errors") == {"scan_interval_minutes": "interval_too_short"}, bad
    done = await hass.config_entries.subentries.async_configure(
        result["flow_id"], {"camera_entity": "camera.front_door", "prompt": "¿Hay alguien?", "scan_interval_minutes": 0}
    )
    assert done["type"] is FlowResultType.CREATE_ENTRY
    assert done["title"] == "Front door"  # the camera's name; the entity adds its translated name
    await hass.async_block_till_done()  # the update listener reloads the entry
    assert entry.state is ConfigEntryState.LOADED
    entity_id = "image_processing.front_door_analysis"
    assert hass.states.get(entity_id) is not None, hass.states.async_entity_ids("image_processing")
    events = async_capture_events(hass, "sarai_image_analyzed")
    await hass.services.async_call("image_processing", "scan", {"entity_id": entity_id}, blocking=True)
    state = hass.states.get(entity_id)
    assert state.attributes["description"] is not None
    assert state.attributes["analyzed_at"]
    assert events and events[0].data["camera_entity"] == "camera.front_door"

    # A camera that returns a non-image: logged, kept as last_error, next scan works again.
    front_door.image = b"not an image"
    await hass.services.async_call("image_processing", "scan", {"entity_id": entity_id}, blocking=True)
    assert hass.states.get(entity_id).attributes["last_error"]
    front_door.image = None
    await hass.services.async_call("image_processing", "scan", {"entity_id": entity_id}, blocking=True)
    from devtools.media import make_jpeg

    front_door.image = make_jpeg()
    await hass.services.async_call("image_processing", "scan", {"entity_id": entity_id}, blocking=True)
    assert hass.states.get(entity_id).attributes["last_error"] is None

    # Same camera + question again: aborted.
    again = await hass.config_entries.subentries.async_init((entry.entry_id, "camera"), context={"source": "user"})
    again = await hass.config_entries.subentries.async_configure(
        again["flow_id"], {"camera_entity": "camera.front_door", "prompt": "¿Hay alguien?", "scan_interval_minutes": 0}
    )
    assert again["type"] is FlowResultType.ABORT

    assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()
    state = hass.states.get(entity_id)
    assert state is None or state.state == "unavailable"
    from homeassistant.components.image_processing.const import DATA_COMPONENT

    assert hass.data[DATA_COMPONENT].get_entity(entity_id) is None


async def test_camera_subentry_reconfigure_and_interval(
    hass: HomeAssistant, make_entry, omni_path: str, front_door
) -> None:
    """Reconfiguring a camera analysis reloads it with the new question and its scan interval."""
    entry = make_entry({"omni_model": omni_path})
    entry.subentries = {}
    entry.add_to_hass(hass)
    hass.config_entries.async_add_subentry(
        entry,
        __import__("homeassistant.config_entries", fromlist=["ConfigSubentry"]).ConfigSubentry(
            **ConfigSubentryData(
                data={"camera_entity": "camera.front_door", "prompt": "q1", "scan_interval_minutes": 0},
                subentry_type="camera",
                title="Door",
                unique_id=None,
            )
        ),
    )
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    subentry_id = next(iter(entry.subentries))
    flow = await entry.start_subentry_reconfigure_flow(hass, subentry_id)
    bad = await hass.config_entries.subentries.async_configure(
        flow["flow_id"], {"camera_entity": "camera.front_door", "prompt": "q2", "scan_interval_minutes": 0.2}
    )
    assert bad["errors"] == {"scan_interval_minutes": "interval_too_short"}
    done = await hass.config_entries.subentries.async_configure(
        bad["flow_id"], {"camera_entity": "camera.front_door", "prompt": "q2", "scan_interval_minutes": 5}
    )
    assert done["reason"] == "reconfigure_successful"
    await hass.async_block_till_done()
    state = hass.states.get("image_processing.door_analysis")
    assert state.attributes["prompt"] == "q2"
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_ai_task_camera_attachment_text_and_structure(
    hass: HomeAssistant, make_entry, omni_path: str, front_door, solar
) -> None:
    """ai_task.generate_data: a camera snapshot seen by Omni; structured data validated, retried once."""
    assert await async_setup_component(hass, "media_source", {})
    entry = make_entry(
        {"omni_model": omni_path, "solar_url": solar.url}, {"routing_mode": "remote", "llm_hass_api": []}
    )
    await _setup(hass, entry)
    entity_id = "ai_task.sarai_ai_task"
    assert hass.states.get(entity_id) is not None
    attachment = {"media_content_id": "media-source://camera/camera.front_door", "media_content_type": "image/jpeg"}
    result = await ai_task.async_generate_data(
        hass, task_name="door", entity_id=entity_id, instructions="¿Quién está en la puerta?", attachments=[attachment]
    )
    assert isinstance(result.data, str)

    solar.replies = [{"text": "no es json"}, {"text": '{"people": 1, "summary": "una persona"}'}]
    structure = vol.Schema({vol.Required("people"): int, vol.Required("summary"): str})
    result = await ai_task.async_generate_data(
        hass,
        task_name="count",
        entity_id=entity_id,
        instructions="¿Cuántas personas hay?",
        structure=structure,
        attachments=[attachment],
    )
    assert result.data == {"people": 1, "summary": "una persona"}
    assert any("What the attachments show" in str(m["content"]) for m in solar.requests[-1]["messages"])
    assert solar.requests[-1]["response_format"]["type"] == "json_schema"

    solar.replies = [{"text": "nope"}, {"text": '{"people": "many"}'}]
    with pytest.raises(HomeAssistantError) as err:
        await ai_task.async_generate_data(
            hass, task_name="count", entity_id=entity_id, instructions="¿Cuántas?", structure=structure
        )
    assert err.value.translation_key == "json_parse_error"
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_ai_task_bad_attachments(hass: HomeAssistant, make_entry, omni_path: str, tmp_path: Path) -> None:
    """A non-image attachment and a corrupt image are translated errors; the next task works."""
    from homeassistant.components.conversation import Attachment

    entry = make_entry({"omni_model": omni_path}, {"llm_hass_api": []})
    await _setup(hass, entry)
    entity = hass.data[ai_task.DATA_COMPONENT].get_entity("ai_task.sarai_ai_task")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hola")
    fake_jpeg = tmp_path / "fake.jpg"
    fake_jpeg.write_bytes(b"\xff\xd8 not really")
    for path, mime, key in (
        (text_file, "text/plain", "unsupported_attachment"),
        (fake_jpeg, "image/jpeg", "image_invalid"),
    ):
        task = ai_task.GenDataTask(
            name="t", instructions="describe", attachments=[Attachment("media-source://x", mime, path)]
        )
        with pytest.raises(ServiceValidationError) as err:
            await entity._describe_attachments(task)
        assert err.value.translation_key == key
    result = await ai_task.async_generate_data(
        hass, task_name="t", entity_id="ai_task.sarai_ai_task", instructions="hola"
    )
    assert isinstance(result.data, str)
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_analyze_video_file_events_and_bad_inputs(
    hass: HomeAssistant, make_entry, omni_path: str, solar, clip_path: Path, tmp_path: Path, front_door
) -> None:
    """sarai.analyze_video: frames + audio through Omni, events from a scripted SOLAR, fired on the bus."""
    hass.config.allowlist_external_dirs = {str(clip_path.parent), str(tmp_path)}
    entry = make_entry({"omni_model": omni_path, "solar_url": solar.url}, {"routing_mode": "remote"})
    await _setup(hass, entry)
    fired = async_capture_events(hass, "sarai_video_event")
    analyzed = async_capture_events(hass, "sarai_video_analyzed")
    solar.replies = [
        {
            "text": _events_json(
                {
                    "label": "person",
                    "confidence": 0.9,
                    "start_s": 2.0,
                    "end_s": 4.5,
                    "description": "un cuadrado entra",
                },
                {"label": "glass breaking", "confidence": 0.7, "start_s": 3.0, "end_s": 3.5, "description": "pitido"},
            )
        }
    ]
    result = await hass.services.async_call(
        DOMAIN,
        "analyze_video",
        {"file_path": str(clip_path), "duration": 6, "fps": 2, "events": ["person", "glass breaking"]},
        blocking=True,
        return_response=True,
    )
    assert result["frames"] == 10
    assert result["frame_times"][4] == 2.0
    assert result["audio_s"] == pytest.approx(5.0, abs=0.1)
    assert result["route"] == "omni_video_audio"
    assert [e["label"] for e in result["events"]] == ["person", "glass breaking"]
    assert len(fired) == 2 and fired[0].data["file_path"] == str(clip_path)
    assert len(analyzed) == 1
    omni = entry.runtime_data.engine.manager.backend("omni")
    assert "video_second_per_grid" in omni.last_video_inputs or "pixel_values_videos" in omni.last_video_inputs
    assert "input_features" in omni.last_video_inputs

    # Invalid JSON twice: the summary comes back with no events and a warning.
    solar.replies = [
        {"text": "nada"},
        {"text": _events_json({"label": "ufo", "confidence": 2, "start_s": 0, "end_s": 1, "description": ""})},
    ]
    result = await hass.services.async_call(
        DOMAIN,
        "analyze_video",
        {"file_path": str(clip_path), "events": ["person"]},
        blocking=True,
        return_response=True,
    )
    assert result["events"] == [] and result["warnings"]

    # From the camera's stream source (a local file standing in for RTSP), without audio.
    solar.replies = [{"text": _events_json()}]
    result = await hass.services.async_call(
        DOMAIN,
        "analyze_video",
        {"camera_entity_id": "camera.front_door", "with_audio": False, "duration": 3},
        blocking=True,
        return_response=True,
    )
    assert result["route"] == "omni_video_only" and result["audio_s"] == 0

    # Bad inputs: clear errors, and the next call works.
    from devtools.media import make_clip

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(clip_path.read_bytes()[:3000])
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00" * 4096)
    silent = make_clip(tmp_path / "silent.mp4", seconds=2, audio=False)
    cases = [
        ({"file_path": "/etc/passwd"}, "path_not_allowed"),
        ({"file_path": str(garbage)}, "video_invalid"),
        ({"file_path": str(broken)}, "video_invalid"),
        ({"file_path": str(tmp_path / "missing.mp4")}, "file_missing"),
    ]
    for data, key in cases:
        with pytest.raises(HomeAssistantError) as err:
            await hass.services.async_call(DOMAIN, "analyze_video", data, blocking=True, return_response=True)
        assert err.value.translation_key == key, (data, err.value)
    front_door.source = None
    with pytest.raises(ServiceValidationError) as err:
        await hass.services.async_call(
            DOMAIN, "analyze_video", {"camera_entity_id": "camera.front_door"}, blocking=True, return_response=True
        )
    assert err.value.translation_key == "no_stream_source"
    with pytest.raises(vol.Invalid):
        await hass.services.async_call(
            DOMAIN, "analyze_video", {"file_path": str(clip_path), "duration": 99}, blocking=True
        )
    with pytest.raises(vol.Invalid):
        await hass.services.async_call(DOMAIN, "analyze_video", {}, blocking=True)
    solar.replies = [{"text": _events_json()}]
    result = await hass.services.async_call(
        DOMAIN, "analyze_video", {"file_path": str(silent)}, blocking=True, return_response=True
    )
    assert "no audio track" in result["warnings"][0]
    assert await hass.config_entries.async_unload(entry.entry_id)
    with pytest.raises(ServiceValidationError):
        await hass.services.async_call(
            DOMAIN, "analyze_video", {"file_path": str(clip_path)}, blocking=True, return_response=True
        )


async def test_video_needs_omni(hass: HomeAssistant, make_entry, clip_path: Path) -> None:
    """With only a GGUF, video analysis says what to configure."""
    hass.config.allowlist_external_dirs = {str(clip_path.parent)}
    entry = make_entry()
    await _setup(hass, entry)
    with pytest.raises(ServiceValidationError) as err:
        await hass.services.async_call(
            DOMAIN, "analyze_video", {"file_path": str(clip_path)}, blocking=True, return_response=True
        )
    assert err.value.translation_key == "unsupported_video"
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_blueprint_end_to_end(
    hass: HomeAssistant, make_entry, omni_path: str, solar, front_door, clip_path: Path
) -> None:
    """The shipped blueprint: motion -> sarai.analyze_video on the camera -> the notify action per event."""
    import shutil

    dest = Path(hass.config.path("blueprints/automation/sarai"))
    await hass.async_add_executor_job(lambda: dest.mkdir(parents=True, exist_ok=True))
    src = Path(__file__).parent.parent / "blueprints/automation/sarai/video_event_notify.yaml"
    await hass.async_add_executor_job(shutil.copy, src, dest / src.name)
    entry = make_entry({"omni_model": omni_path, "solar_url": solar.url}, {"routing_mode": "remote"})
    await _setup(hass, entry)
    hass.states.async_set("binary_sensor.porch_motion", "off")
    notified = async_capture_events(hass, "test_notified")
    assert await async_setup_component(
        hass,
        "automation",
        {
            "automation": {
                "use_blueprint": {
                    "path": "sarai/video_event_notify.yaml",
                    "input": {
                        "motion_sensor": "binary_sensor.porch_motion",
                        "camera": "camera.front_door",
                        "events": ["person", "package"],
                        "min_confidence": 0.5,
                        "notify_action": [
                            {
                                "event": "test_notified",
                                "event_data": {"label": "{{ label }}", "text": "{{ description }}"},
                            }
                        ],
                    },
                }
            }
        },
    )
    await hass.async_block_till_done()
    solar.replies = [
        {
            "text": _events_json(
                {"label": "package", "confidence": 0.8, "start_s": 1.0, "end_s": 2.0, "description": "una caja"},
                {"label": "person", "confidence": 0.2, "start_s": 2.0, "end_s": 3.0, "description": "dudoso"},
            )
        }
    ]
    hass.states.async_set("binary_sensor.porch_motion", "on")
    for _ in range(200):
        await hass.async_block_till_done()
        if notified:
            break
        await asyncio.sleep(0.05)
    assert [e.data["label"] for e in notified] == ["package"]
    assert notified[0].data["text"] == "una caja"
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_gguf_mmproj_only_hears_sees_and_analyses_frames(
    hass: HomeAssistant, make_entry, mmproj_path: str, solar, clip_path: Path
) -> None:
    """GGUF + mmproj (no transformers checkpoint): STT exists and hears, no TTS, video is frames-only."""
    from homeassistant.components import stt

    from devtools.media import make_speech_wav

    hass.config.allowlist_external_dirs = {str(clip_path.parent)}
    entry = make_entry({"mmproj_model": mmproj_path, "solar_url": solar.url}, {"routing_mode": "remote"})
    await _setup(hass, entry)
    assert hass.states.get("tts.sarai_text_to_speech") is None
    entity = stt.async_get_speech_to_text_entity(hass, "stt.sarai_speech_to_text")
    assert entity is not None
    meta = speech_metadata()

    async def audio():
        yield make_speech_wav()

    result = await entity.async_process_audio_stream(meta, audio())
    assert result.result is stt.SpeechResultState.SUCCESS and result.text
    solar.replies = [{"text": _events_json()}]
    response = await hass.services.async_call(
        DOMAIN, "analyze_video", {"file_path": str(clip_path)}, blocking=True, return_response=True
    )
    assert response["route"] == "gguf_frames_only"
    assert response["audio_s"] == 0
    assert any("frames only" in w for w in response["warnings"])
    assert await hass.config_entries.async_unload(entry.entry_id)
