"""llama-cpp-python, and torch + transformers for an Omni checkpoint, on demand, with Home Assistant's own
requirements machinery.

None of them is in manifest.json: PyPI has only llama-cpp-python's source package, which compiles for minutes
and cannot build on Home Assistant OS / Container (musl, no compiler), and PyTorch is large and has no musl
wheels; the integration must still load there (server placement). The config flow installs what the chosen
placement and model files need behind a progress step; setup tries once more before failing with a
translated error, so a missing package never surfaces as an ImportError at the first turn.
"""

from __future__ import annotations

from collections.abc import Sequence
import importlib
import importlib.util

from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.requirements import RequirementsNotFound, async_process_requirements

from .const import DOMAIN, LLAMA_CPP_REQUIREMENT, LOGGER, OMNI_REQUIREMENTS

# The module each on-demand requirement provides (torchvision: the Qwen2.5-Omni processor's video part).
REQUIREMENT_MODULES = {
    LLAMA_CPP_REQUIREMENT: "llama_cpp",
    **{req: req.split("==", 1)[0] for req in OMNI_REQUIREMENTS},
}


def llama_cpp_importable() -> bool:
    """Whether llama-cpp-python can be imported (runs in the executor: the first import loads libllama)."""
    try:
        importlib.import_module("llama_cpp")
    except ImportError:
        return False
    return True


def _findable(module: str) -> bool:
    """Whether a package is installed, without importing it (importing torch costs ~1 GB of memory; the
    engine imports it when it builds the Omni backend, and says which package is missing if that fails)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError, ValueError:
        return False


def missing_requirements(omni: bool) -> list[str]:
    """The on-demand requirements of a local model (placements in Home Assistant and worker) that are not
    installed: llama-cpp-python, and with an Omni checkpoint (``omni``) torch, torchvision and transformers.
    Blocking: run it in the executor."""
    missing = [] if llama_cpp_importable() else [LLAMA_CPP_REQUIREMENT]
    if omni:
        missing += [req for req in OMNI_REQUIREMENTS if not _findable(REQUIREMENT_MODULES[req])]
    return missing


def is_musl() -> bool:
    """Whether this Python runs on musl (Alpine: Home Assistant OS and Container), where PyPI has no PyTorch."""
    from packaging import tags

    return any(tag.startswith("musllinux") for tag in tags.platform_tags())


def package_names(requirements: Sequence[str]) -> str:
    """``torch, transformers`` for the messages (names, no versions)."""
    return ", ".join(req.split("==", 1)[0] for req in requirements)


async def install_requirements(hass: HomeAssistant, requirements: Sequence[str]) -> list[str]:
    """Install ``requirements``; return those whose packages still cannot be found afterwards (empty: done).

    On musl PyTorch is not even tried (PyPI has no wheel for it: pip would only fail, slowly); Home Assistant
    does not retry a requirement that failed once until it restarts.
    """
    wanted = list(requirements)
    if any(req in OMNI_REQUIREMENTS for req in wanted) and await hass.async_add_executor_job(is_musl):
        LOGGER.warning(
            "PyTorch has no packages for musl (Home Assistant OS / Container): not installing %s",
            package_names(OMNI_REQUIREMENTS),
        )
        wanted = [req for req in wanted if req not in OMNI_REQUIREMENTS]
    if wanted:
        LOGGER.info("Installing %s (this may take several minutes)", ", ".join(wanted))
        try:
            await async_process_requirements(hass, DOMAIN, wanted)
        except (RequirementsNotFound, HomeAssistantError) as err:
            LOGGER.warning("Installing %s failed: %s", ", ".join(wanted), err)
        importlib.invalidate_caches()
    omni = any(req in OMNI_REQUIREMENTS for req in requirements)
    missing = await hass.async_add_executor_job(missing_requirements, omni)
    return [req for req in requirements if req in missing]
