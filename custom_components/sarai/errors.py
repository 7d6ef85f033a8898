"""Map engine errors to translated Home Assistant errors, in one place."""

from __future__ import annotations

from homeassistant.exceptions import HomeAssistantError, ServiceValidationError

from .const import DOMAIN, LOGGER
from .engine.errors import EngineError, InvalidInput, UnsupportedModality


def to_ha_error(err: EngineError) -> HomeAssistantError:
    """Return the translated Home Assistant error for an engine error; the English detail goes to the debug log."""
    LOGGER.debug("%s (%s): %s", type(err).__name__, err.translation_key, err)
    cls = ServiceValidationError if isinstance(err, (InvalidInput, UnsupportedModality)) else HomeAssistantError
    return cls(
        translation_domain=DOMAIN,
        translation_key=err.translation_key,
        translation_placeholders=err.placeholders,
    )
