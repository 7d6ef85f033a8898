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
from homeassistant.const import STATE_UNAVAILABLE
from homeassistant.core import CALLBACK_TYPE, Event, EventStateChangedData, HomeAssistant, callback
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback
from homeassistant.helpers.event import async_call_later, async_track_state_change_event, async_track_time_interval
from homeassistant.util import dt as dt_util

from . import SaraiConfigEntry
from .const import (
    CONF_CAMERA_ENTITY,
    CONF_PROMPT,
    CONF_SCAN_INTERVAL_MINUTES,
    DEFAULT_CAMERA_PROMPT,
    DOMAIN,
    EVENT_IMAGE_ANALYZED,
    LOGGER,
    SUBENTRY_CAMERA,
)
from .engine.errors import EngineError
from .entity import SaraiSubentryEntity
from .errors import to_ha_error

PARALLEL_UPDATES = 1
FAILURES_BEFORE_UNAVAILABLE = 3
RETRY_WHILE_FAILING = timedelta(minutes=5)
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


class SaraiCameraAnalysis(ImageProcessingEntity, SaraiSubentryEntity):
    """Answers a question about a camera's current image."""

    _attr_should_poll = False
    _attr_translation_key = "camera_analysis"
    _failures = 0
    _camera_ok = True
    _retry: CALLBACK_TYPE | None = None

    def __init__(self, entry: SaraiConfigEntry, subentry: ConfigSubentry) -> None:
        """Create the entity of one sub-entry, on the sub-entry's own device."""
        SaraiSubentryEntity.__init__(self, entry, subentry, "Camera analysis")
        self._camera: str = subentry.data[CONF_CAMERA_ENTITY]
        self._attr_camera_entity = self._camera
        self._prompt: str = subentry.data.get(CONF_PROMPT) or DEFAULT_CAMERA_PROMPT
        self._interval = int(subentry.data.get(CONF_SCAN_INTERVAL_MINUTES, 0))
        self._description: str | None = None
        self._analyzed_at: str | None = None
        self._last_error: str | None = None

    async def async_added_to_hass(self) -> None:
        """Schedule the optional periodic scan; follow the camera's availability."""
        await super().async_added_to_hass()
        if self._interval > 0:

            async def _scan(_now: Any) -> None:
                await self.async_update_ha_state(True)

            self.async_on_remove(
                async_track_time_interval(self.hass, _scan, timedelta(minutes=self._interval), cancel_on_shutdown=True)
            )
        self.async_on_remove(async_track_state_change_event(self.hass, [self._camera], self._camera_changed))
        self.async_on_remove(self._cancel_retry)
        self._camera_ok = self._camera_usable()
        self._refresh_available()

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

    # -- availability: the camera must exist and be available; repeated failures make it unavailable --

    def _camera_usable(self) -> bool:
        state = self.hass.states.get(self._camera)
        return state is not None and state.state != STATE_UNAVAILABLE

    def _refresh_available(self) -> None:
        self._attr_available = self._camera_ok and self._failures < FAILURES_BEFORE_UNAVAILABLE

    @callback
    def _camera_changed(self, event: Event[EventStateChangedData]) -> None:
        usable = self._camera_usable()
        if usable == self._camera_ok:
            return
        self._camera_ok = usable
        if not usable:
            self._last_error = self._message("camera_unavailable", camera=self._camera)
        self._refresh_available()
        if usable and not self._attr_available:
            self._schedule_retry()
        self.async_write_ha_state()

    @callback
    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry()
            self._retry = None

    @callback
    def _schedule_retry(self) -> None:
        """While failing repeatedly (and so unavailable, which ``image_processing.scan`` skips), retry now and then."""
        self._cancel_retry()

        async def _again(_now: Any) -> None:
            self._retry = None
            await self.async_update_ha_state(True)

        self._retry = async_call_later(self.hass, RETRY_WHILE_FAILING, _again)

    def _message(self, key: str, **placeholders: str) -> str:
        """The translated text of one of SARAi's exceptions (what ``last_error`` shows)."""
        return str(
            HomeAssistantError(translation_domain=DOMAIN, translation_key=key, translation_placeholders=placeholders)
        )

    def _failed(self, message: str) -> None:
        if self._last_error is None:
            LOGGER.warning("Camera analysis of %s failed: %s", self._attr_camera_entity, message)
        self._last_error = message
        self._failures += 1
        self._refresh_available()
        if not self._attr_available and self._camera_ok:
            self._schedule_retry()

    async def async_update(self) -> None:
        """Fetch the camera image and analyse it (``image_processing.scan``, the interval or a retry).

        Every failure is recorded in ``last_error`` as a translated sentence (never a traceback) and
        logged once; after ``FAILURES_BEFORE_UNAVAILABLE`` in a row the entity is unavailable until an
        analysis works again. A missing or unavailable camera makes it unavailable until the camera is back.
        """
        self._camera_ok = self._camera_usable()
        if not self._camera_ok:
            self._last_error = self._message("camera_unavailable", camera=self._camera)
            self._refresh_available()
            return
        try:
            image = await async_get_image(self.hass, self._camera, timeout=self.timeout)
            await self.async_process_image(image.content)
        except HomeAssistantError as err:
            self._failed(str(err))
            return
        except Exception:  # noqa: BLE001 - an unexpected failure is shown as a sentence, detailed in the log
            LOGGER.debug("Camera analysis of %s failed unexpectedly", self._attr_camera_entity, exc_info=True)
            self._failed(self._message("engine_error"))
            return
        if self._last_error is not None:
            LOGGER.info("Camera analysis of %s works again", self._attr_camera_entity)
        self._last_error = None
        self._failures = 0
        self._cancel_retry()
        self._refresh_available()

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
