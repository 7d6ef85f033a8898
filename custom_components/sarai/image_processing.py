"""Camera analysis: one image-processing entity per camera subentry, scanned on demand (or on an interval).

Home Assistant's image_processing component has no ``async_setup_entry``; SARAi sets the component
up and hands it this platform for the config entry (``EntityComponent.async_setup_entry``), so the
entities belong to the entry, to its device and subentries, and go away when the entry unloads.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from homeassistant.components.camera import async_get_image
from homeassistant.components.image_processing import ImageProcessingEntity
from homeassistant.config_entries import ConfigSubentry
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback
from homeassistant.helpers.event import async_track_time_interval
from homeassistant.util import dt as dt_util

from . import SaraiConfigEntry
from .const import (
    CONF_CAMERA_ENTITY,
    CONF_PROMPT,
    CONF_SCAN_INTERVAL_MINUTES,
    DEFAULT_CAMERA_PROMPT,
    EVENT_IMAGE_ANALYZED,
    LOGGER,
    SUBENTRY_CAMERA,
)
from .engine.errors import EngineError
from .entity import SaraiEntity
from .errors import to_ha_error

PARALLEL_UPDATES = 1
SCAN_INTERVAL = timedelta(days=365)  # never polled by the component; see scan_interval_minutes


async def async_setup_entry(
    hass: HomeAssistant, entry: SaraiConfigEntry, async_add_entities: AddConfigEntryEntitiesCallback
) -> None:
    """One entity per camera subentry."""
    for subentry in entry.subentries.values():
        if subentry.subentry_type == SUBENTRY_CAMERA:
            async_add_entities([SaraiCameraAnalysis(entry, subentry)], config_subentry_id=subentry.subentry_id)


def short_answer(text: str) -> str:
    """The state: the first sentence or line, at most 255 characters."""
    first = text.strip().split("\n", 1)[0]
    for mark in (". ", "? ", "! "):
        if mark in first:
            first = first.split(mark, 1)[0] + mark.strip()
    return first[:255]


class SaraiCameraAnalysis(ImageProcessingEntity, SaraiEntity):
    """Answers a question about a camera's current image."""

    _attr_should_poll = False
    _attr_translation_key = "camera_analysis"

    def __init__(self, entry: SaraiConfigEntry, subentry: ConfigSubentry) -> None:
        """Create the entity for one subentry."""
        SaraiEntity.__init__(self, entry, f"camera_{subentry.subentry_id}")
        self._camera: str = subentry.data[CONF_CAMERA_ENTITY]
        self._attr_camera_entity = self._camera
        self._attr_name = subentry.title
        self._prompt: str = subentry.data.get(CONF_PROMPT) or DEFAULT_CAMERA_PROMPT
        self._interval = int(subentry.data.get(CONF_SCAN_INTERVAL_MINUTES, 0))
        self._description: str | None = None
        self._analyzed_at: str | None = None
        self._last_error: str | None = None

    async def async_added_to_hass(self) -> None:
        """Schedule the optional periodic scan."""
        await super().async_added_to_hass()
        if self._interval > 0:

            async def _scan(_now: Any) -> None:
                await self.async_update_ha_state(True)

            self.async_on_remove(
                async_track_time_interval(self.hass, _scan, timedelta(minutes=self._interval), cancel_on_shutdown=True)
            )

    @property
    def extra_state_attributes(self) -> dict[str, Any]:
        """The full answer, the question and when."""
        return {
            "description": self._description,
            "prompt": self._prompt,
            "analyzed_at": self._analyzed_at,
            "camera_entity": self._attr_camera_entity,
            "last_error": self._last_error,
        }

    async def async_update(self) -> None:
        """Fetch the camera image and analyse it (called by image_processing.scan)."""
        try:
            image = await async_get_image(self.hass, self._camera, timeout=self.timeout)
            await self.async_process_image(image.content)
        except HomeAssistantError as err:
            if self._last_error is None:
                LOGGER.warning("Camera analysis of %s failed: %s", self._attr_camera_entity, err)
            self._last_error = str(err)
            return
        if self._last_error is not None:
            LOGGER.info("Camera analysis of %s works again", self._attr_camera_entity)
        self._last_error = None

    async def async_process_image(self, image: bytes) -> None:
        """Ask Omni the question about the image; fire sarai_image_analyzed."""
        try:
            answer = await self.engine.describe_image(image, self._prompt)
        except EngineError as err:
            raise to_ha_error(err) from err
        self._description = answer
        self._attr_state = short_answer(answer)
        self._analyzed_at = dt_util.utcnow().isoformat()
        self.hass.bus.async_fire(
            EVENT_IMAGE_ANALYZED,
            {
                "entity_id": self.entity_id,
                "camera_entity": self._attr_camera_entity,
                "prompt": self._prompt,
                "answer": answer,
            },
        )
