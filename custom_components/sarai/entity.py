"""Base entity: one device "SARAi" for every platform."""

from __future__ import annotations

from homeassistant.helpers.device_registry import DeviceEntryType, DeviceInfo
from homeassistant.helpers.entity import Entity

from . import SaraiConfigEntry
from .const import DOMAIN


class SaraiEntity(Entity):
    """Common device info and naming."""

    _attr_has_entity_name = True

    def __init__(self, entry: SaraiConfigEntry, key: str) -> None:
        """Attach to the SARAi device."""
        self.entry = entry
        self.engine = entry.runtime_data.engine
        self._attr_unique_id = f"{entry.entry_id}_{key}"
        self._attr_device_info = DeviceInfo(
            identifiers={(DOMAIN, entry.entry_id)},
            name="SARAi",
            manufacturer="SARAi",
            model="Qwen2.5-Omni",
            entry_type=DeviceEntryType.SERVICE,
        )
