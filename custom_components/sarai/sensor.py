"""Status sensors: engine state, memory in use, last route, last turn latency."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from homeassistant.components.sensor import (
    SensorDeviceClass,
    SensorEntity,
    SensorEntityDescription,
    SensorStateClass,
)
from homeassistant.const import EntityCategory, UnitOfInformation, UnitOfTime
from homeassistant.core import Event, HomeAssistant, callback
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback
from homeassistant.helpers.event import async_track_time_interval

from . import SaraiConfigEntry
from .const import EVENT_ROUTE
from .engine import SaraiEngine
from .entity import SaraiEntity

PARALLEL_UPDATES = 0
REFRESH_INTERVAL = timedelta(seconds=30)


@dataclass(frozen=True, kw_only=True)
class SaraiSensorDescription(SensorEntityDescription):
    """How to read one value from the engine."""

    value: Callable[[SaraiEngine], Any]
    attrs: Callable[[SaraiEngine], dict[str, Any]] | None = None


SENSORS = (
    SaraiSensorDescription(
        key="engine_state",
        translation_key="engine_state",
        device_class=SensorDeviceClass.ENUM,
        options=["idle", "ready", "busy"],
        value=lambda e: e.status().state,
        attrs=lambda e: {"capabilities": e.capabilities},
    ),
    SaraiSensorDescription(
        key="memory_used",
        translation_key="memory_used",
        device_class=SensorDeviceClass.DATA_SIZE,
        native_unit_of_measurement=UnitOfInformation.MEGABYTES,
        state_class=SensorStateClass.MEASUREMENT,
        value=lambda e: e.status().used_estimated_mb,
        attrs=lambda e: {"budget_mb": e.config.memory_budget_mb, "process_rss_mb": e.status().rss_mb},
    ),
    SaraiSensorDescription(
        key="last_route",
        translation_key="last_route",
        device_class=SensorDeviceClass.ENUM,
        options=["local", "remote"],
        value=lambda e: e.last_route.route if e.last_route else None,
        attrs=lambda e: (e.last_route.as_dict() if e.last_route else {}) | {"breaker": e.breaker.state},
    ),
    SaraiSensorDescription(
        key="last_latency",
        translation_key="last_latency",
        device_class=SensorDeviceClass.DURATION,
        native_unit_of_measurement=UnitOfTime.SECONDS,
        state_class=SensorStateClass.MEASUREMENT,
        value=lambda e: e.last_route.duration_s if e.last_route else None,
    ),
)


async def async_setup_entry(
    hass: HomeAssistant, entry: SaraiConfigEntry, async_add_entities: AddConfigEntryEntitiesCallback
) -> None:
    """Add the status sensors."""
    sensors = [SaraiSensor(entry, d) for d in SENSORS]
    async_add_entities(sensors)

    @callback
    def _refresh(_event: Event | datetime) -> None:
        for entity in sensors:
            if entity.hass is not None:
                entity.async_write_ha_state()

    entry.async_on_unload(hass.bus.async_listen(EVENT_ROUTE, _refresh))
    # Memory and load state change without a turn (idle unload, warm-up): refresh them now and then.
    entry.async_on_unload(async_track_time_interval(hass, _refresh, REFRESH_INTERVAL, cancel_on_shutdown=True))


class SaraiSensor(SaraiEntity, SensorEntity):
    """One engine status value."""

    _attr_entity_category = EntityCategory.DIAGNOSTIC
    _attr_should_poll = False
    entity_description: SaraiSensorDescription

    def __init__(self, entry: SaraiConfigEntry, description: SaraiSensorDescription) -> None:
        """Create the sensor."""
        super().__init__(entry, description.key)
        self.entity_description = description

    @property
    def native_value(self) -> Any:
        """Current value."""
        return self.entity_description.value(self.engine)

    @property
    def extra_state_attributes(self) -> dict[str, Any] | None:
        """Details."""
        return self.entity_description.attrs(self.engine) if self.entity_description.attrs else None
