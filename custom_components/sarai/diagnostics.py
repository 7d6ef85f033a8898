"""Diagnostics: configuration (secrets redacted), engine, router, versions."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from homeassistant.components.diagnostics import async_redact_data
from homeassistant.core import HomeAssistant
import yarl

from . import SaraiConfigEntry
from .const import CONF_SERVER_API_KEY, CONF_SERVER_URL, CONF_SOLAR_API_KEY, CONF_SOLAR_URL
from .engine.router import rules_as_dict
from .engine.solar import redact_url

TO_REDACT = {CONF_SOLAR_API_KEY, CONF_SERVER_API_KEY}
REDACTED = "**REDACTED**"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _secrets(entry: SaraiConfigEntry) -> list[str]:
    """Every secret the entry holds, as text that could appear anywhere (an error message, a URL)."""
    secrets = [str(entry.data.get(CONF_SOLAR_API_KEY) or "")]
    if url := entry.data.get(CONF_SOLAR_URL):
        try:
            parsed = yarl.URL(url)
            secrets += [parsed.user or "", parsed.password or "", parsed.raw_query_string, parsed.raw_fragment]
            secrets += [value for value in parsed.query.values()]
        except ValueError, TypeError:
            secrets.append(url)
    return sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True)


def _scrub(value: Any, secrets: list[str]) -> Any:
    """Replace every secret inside strings, however deep."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v, secrets) for v in value]
    return value


async def async_get_config_entry_diagnostics(hass: HomeAssistant, entry: SaraiConfigEntry) -> dict[str, Any]:
    """Return diagnostics for a config entry: the API key, the URL's credentials and query never appear."""
    engine = entry.runtime_data.engine
    versions = await hass.async_add_executor_job(
        lambda: {p: _version(p) for p in ("llama-cpp-python", "transformers", "torch", "av", "numpy")}
    )
    data = async_redact_data(dict(entry.data), TO_REDACT)
    for key in (CONF_SOLAR_URL, CONF_SERVER_URL):
        if url := data.get(key):
            data[key] = redact_url(url)
    diagnostics: dict[str, Any] = _scrub(
        {
            "data": data,
            "options": async_redact_data(dict(entry.options), TO_REDACT),
            "subentries": [
                {"type": s.subentry_type, "title": s.title, "data": dict(s.data)} for s in entry.subentries.values()
            ],
            "placement": engine.placement,
            "inference": engine.remote.as_dict() if engine.remote is not None else None,
            "prompt_cache": engine.text.cache_status() if engine.remote is None else None,
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
        },
        _secrets(entry),
    )
    return diagnostics
