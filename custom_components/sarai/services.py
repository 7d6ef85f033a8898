"""Actions: sarai.analyze_video (camera clips or allowed files, with their audio, into events); admin only."""

from __future__ import annotations

import os
from typing import Any

from homeassistant.components.camera import async_get_stream_source
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant, ServiceCall, ServiceResponse, SupportsResponse, callback
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.helpers import config_validation as cv
from homeassistant.helpers.service import async_register_admin_service
import probatio as vol

from .const import DOMAIN, EVENT_VIDEO_ANALYZED, EVENT_VIDEO_EVENT, SERVICE_ANALYZE_VIDEO
from .engine.errors import EngineError, InvalidInput
from .engine.files import resolve_regular
from .engine.media import MAX_DURATION_S
from .errors import to_ha_error

ATTR_CAMERA = "camera_entity_id"
ATTR_FILE = "file_path"

ANALYZE_VIDEO_SCHEMA = vol.All(
    vol.Schema(
        {
            vol.Exclusive(ATTR_CAMERA, "source"): cv.entity_id,
            vol.Exclusive(ATTR_FILE, "source"): cv.string,
            vol.Optional("duration", default=6.0): vol.All(vol.Coerce(float), vol.Range(min=0.5, max=MAX_DURATION_S)),
            vol.Optional("fps", default=2.0): vol.All(vol.Coerce(float), vol.Range(min=0.25, max=8)),
            vol.Optional("prompt", default=""): cv.string,
            vol.Optional("with_audio", default=True): cv.boolean,
            vol.Optional("events", default=[]): vol.All(cv.ensure_list, [cv.string]),
        }
    ),
    cv.has_at_least_one_key(ATTR_CAMERA, ATTR_FILE),
)


def allowed_file(hass: HomeAssistant, path: str) -> str:
    """The real path of a regular file inside ``allowlist_external_dirs`` (blocking: run it in the executor).

    Symlinks are resolved before the allowlist is checked, so a link inside an allowed directory
    cannot point outside it; then the file must be a regular file (no FIFO, device, directory or
    socket). The clip reader opens the real path again and re-checks the opened descriptor.
    """
    real = os.path.realpath(path) if os.path.isabs(path) else None
    if real is None or not hass.config.is_allowed_path(real):
        raise InvalidInput(f"{path} is not inside allowlist_external_dirs", key="path_not_allowed", path=path)
    return resolve_regular(real)


@callback
def async_setup_services(hass: HomeAssistant) -> None:
    """Register SARAi's actions (once, in async_setup)."""

    async def analyze_video(call: ServiceCall) -> ServiceResponse:
        entries = hass.config_entries.async_entries(DOMAIN)
        entry = next((e for e in entries if e.state is ConfigEntryState.LOADED), None)
        if entry is None:
            raise ServiceValidationError(translation_domain=DOMAIN, translation_key="not_loaded")
        data = call.data
        source_info: dict[str, Any]
        if camera_id := data.get(ATTR_CAMERA):
            try:
                source = await async_get_stream_source(hass, camera_id)
            except HomeAssistantError:  # not a camera, or the camera cannot say
                source = None
            if not source:
                raise ServiceValidationError(
                    translation_domain=DOMAIN,
                    translation_key="no_stream_source",
                    translation_placeholders={"camera": camera_id},
                )
            source_info = {ATTR_CAMERA: camera_id}
        else:
            try:
                source = await hass.async_add_executor_job(allowed_file, hass, data[ATTR_FILE])
            except EngineError as err:
                raise to_ha_error(err) from err
            source_info = {ATTR_FILE: data[ATTR_FILE]}
        try:
            result = await entry.runtime_data.engine.analyze_clip(
                source,
                prompt=data["prompt"],
                duration_s=data["duration"],
                fps=data["fps"],
                with_audio=data["with_audio"],
                labels=data["events"] or None,
            )
        except EngineError as err:
            raise to_ha_error(err) from err
        for event in result["events"]:
            hass.bus.async_fire(EVENT_VIDEO_EVENT, {**source_info, **event}, context=call.context)
        hass.bus.async_fire(
            EVENT_VIDEO_ANALYZED,
            {
                **source_info,
                "summary": result["summary"],
                "labels": [e["label"] for e in result["events"]],
                "route": result["route"],
                "warnings": result["warnings"],
            },
            context=call.context,
        )
        return result if call.return_response else None

    # Reading local files and recording camera streams on demand is an administrator's power.
    async_register_admin_service(
        hass,
        DOMAIN,
        SERVICE_ANALYZE_VIDEO,
        analyze_video,
        schema=ANALYZE_VIDEO_SCHEMA,
        supports_response=SupportsResponse.OPTIONAL,
    )
