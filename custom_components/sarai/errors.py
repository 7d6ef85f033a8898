"""Map engine errors to translated Home Assistant errors, in one place."""

from __future__ import annotations

from homeassistant.exceptions import HomeAssistantError, ServiceValidationError

from .const import DOMAIN
from .engine.errors import EngineError, InvalidInput, UnsupportedModality


def to_ha_error(err: EngineError) -> HomeAssistantError:
    """Return the Home Assistant error for an engine error."""
    cls = ServiceValidationError if isinstance(err, (InvalidInput, UnsupportedModality)) else HomeAssistantError
    return cls(
        translation_domain=DOMAIN,
        translation_key=err.translation_key,
        translation_placeholders=err.placeholders,
    )
