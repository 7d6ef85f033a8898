"""SARAi must install next to Home Assistant: manifest requirements resolve against Home Assistant's own pins.

Home Assistant installs a custom integration's requirements with its package_constraints.txt as constraints;
an exact pin that differs from Home Assistant's (Pillow==12.3.0 against 13.0.0 in 2026.11) makes the whole
integration fail to load. This resolves the manifest against the installed Home Assistant's constraints and
against a copy of the newest release's (2026.11.0), so the next bump fails here and not at a user's.
"""

from __future__ import annotations

import json
from pathlib import Path

import homeassistant
from homeassistant.const import __version__ as HA_VERSION
from packaging.requirements import Requirement
from packaging.version import Version
import pytest

ROOT = Path(__file__).parent.parent
MANIFEST = json.loads((ROOT / "custom_components/sarai/manifest.json").read_text())
CONSTRAINTS = {
    "installed": Path(homeassistant.__file__).parent / "package_constraints.txt",
    "2026.11.0": Path(__file__).parent / "fixtures/package_constraints_2026.11.0.txt",
}


def _pins(path: Path) -> dict[str, str]:
    """name -> exactly pinned version, from a package_constraints.txt."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            req = Requirement(line)
            spec = next(iter(req.specifier))
            pins[req.name.lower().replace("_", "-")] = spec.version
    return pins


@pytest.mark.parametrize("release", sorted(CONSTRAINTS))
def test_manifest_requirements_resolve_against_home_assistant(release: str) -> None:
    """Every requirement Home Assistant pins is satisfied by its pin; none is pinned exactly by SARAi."""
    pins = _pins(CONSTRAINTS[release])
    assert pins, "no constraints read"
    for line in MANIFEST["requirements"]:
        req = Requirement(line)
        name = req.name.lower().replace("_", "-")
        if name in pins:
            assert not any(s.operator in ("==", "===") for s in req.specifier), (
                f"{line}: Home Assistant pins {name}; use a lower bound or nothing"
            )
            assert req.specifier.contains(pins[name], prereleases=True), (
                f"{line} does not accept Home Assistant {release}'s {name}=={pins[name]}"
            )


def test_pillow_not_required() -> None:
    """Pillow ships with Home Assistant itself: SARAi does not ask for it."""
    assert not any(Requirement(r).name.lower() == "pillow" for r in MANIFEST["requirements"])


def test_hacs_minimum_is_true() -> None:
    """hacs.json's minimum Home Assistant is not newer than the one the tests run on, nor older than 2026.10
    (ai_task, config sub-entries and the probatio tool schemas SARAi uses)."""
    minimum = Version(json.loads((ROOT / "hacs.json").read_text())["homeassistant"])
    assert Version("2026.10.0") <= minimum <= Version(HA_VERSION)


def test_on_demand_requirements_are_the_tested_pins() -> None:
    """What the config flow installs on demand (llama-cpp-python; torch, torchvision and transformers for an
    Omni checkpoint) is pinned to the versions the tests run with and the add-on ships, and Home Assistant
    pins none of them (its constraints would make the install fail)."""
    from custom_components.sarai.const import LLAMA_CPP_REQUIREMENT, OMNI_REQUIREMENTS

    tested = _pins(ROOT / "requirements_test.txt")
    addon = _pins(ROOT / "sarai_engine/requirements_torch.txt") | _pins(ROOT / "sarai_engine/requirements_omni.txt")
    for line in (LLAMA_CPP_REQUIREMENT, *OMNI_REQUIREMENTS):
        req = Requirement(line)
        name = req.name.lower()
        assert [s.operator for s in req.specifier] == ["=="], line
        assert tested[name] == next(iter(req.specifier)).version, line
        if name != "llama-cpp-python":
            assert addon[name] == tested[name], line
        for release in CONSTRAINTS:
            assert name not in _pins(CONSTRAINTS[release]), (line, release)
    assert {Requirement(r).name for r in OMNI_REQUIREMENTS} == {"torch", "torchvision", "transformers"}


def test_a_module_without_a_spec_counts_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A module object in ``sys.modules`` that says nothing about where it came from (a stub) is not taken for
    an installed package."""
    import sys
    import types

    from custom_components.sarai.requirements import missing_requirements

    stub = types.ModuleType("transformers")
    stub.__spec__ = None
    monkeypatch.setitem(sys.modules, "transformers", stub)
    assert missing_requirements(omni=True) == ["transformers==5.24.0"]
    assert missing_requirements(omni=False) == []
