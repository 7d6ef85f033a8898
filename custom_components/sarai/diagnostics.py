"""Diagnostics: configuration (secrets redacted), engine, router, versions."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from homeassistant.components.diagnostics import async_redact_data
from homeassistant.core import HomeAssistant

from . import SaraiConfigEntry
from .const import CONF_SOLAR_API_KEY
from .engine.router import rules_as_dict

TO_REDACT = {CONF_SOLAR_API_KEY}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


async def async_get_config_entry_diagnostics(hass: HomeAssistant, entry: SaraiConfigEntry) -> dict[str, Any]:
    """Return diagnostics for a config entry."""
    engine = entry.runtime_data.engine
    versions = await hass.async_add_executor_job(
        lambda: {p: _version(p) for p in ("llama-cpp-python", "transformers", "torch", "av", "numpy")}
    )
    return {
        "data": async_redact_data(dict(entry.data), TO_REDACT),
        "options": async_redact_data(dict(entry.options), TO_REDACT),
        "engine": engine.status().as_dict(),
        "peak_rss_mb": engine.manager.peak_rss_bytes // (1024 * 1024),
        "router": {
            "mode": engine.config.routing_mode,
            "remote_configured": engine.solar is not None,
            "breaker": engine.breaker.as_dict(),
            "last_route": engine.last_route.as_dict() if engine.last_route else None,
            "rules": rules_as_dict(engine.config.rules),
        },
        "versions": versions,
    }
