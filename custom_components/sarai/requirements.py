"""llama-cpp-python on demand, with Home Assistant's own requirements machinery.

It is not in manifest.json: PyPI has only its source package, which compiles for minutes and cannot build on
Home Assistant OS / Container (musl, no compiler), where the integration must still load (server placement).
"""

from __future__ import annotations

import importlib

from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.requirements import RequirementsNotFound, async_process_requirements

from .const import DOMAIN, LLAMA_CPP_REQUIREMENT, LOGGER


def llama_cpp_importable() -> bool:
    """Whether llama-cpp-python can be imported (runs in the executor: the first import loads libllama)."""
    try:
        importlib.import_module("llama_cpp")
    except ImportError:
        return False
    return True


async def install_llama_cpp(hass: HomeAssistant) -> bool:
    """Install llama-cpp-python; True once it can be imported."""
    LOGGER.info("Installing %s (it may compile for several minutes)", LLAMA_CPP_REQUIREMENT)
    try:
        await async_process_requirements(hass, DOMAIN, [LLAMA_CPP_REQUIREMENT])
    except (RequirementsNotFound, HomeAssistantError) as err:
        LOGGER.warning("Installing %s failed: %s", LLAMA_CPP_REQUIREMENT, err)
        return False
    importlib.invalidate_caches()
    return await hass.async_add_executor_job(llama_cpp_importable)
