"""Config, options, reconfigure and reauth flows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from homeassistant import config_entries
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
import pytest

from custom_components.sarai.const import DOMAIN
from tests.common import start_flow

pytestmark = pytest.mark.usefixtures("ha_core")


async def _start(hass: HomeAssistant) -> str:
    result = await start_flow(hass)
    assert result["type"] is FlowResultType.FORM
    return str(result["flow_id"])


async def test_user_flow_creates_entry(hass: HomeAssistant, gguf_path: str, omni_path: str, mmproj_path: str) -> None:
    """Valid paths create the entry; the entry sets up."""
    flow_id = await _start(hass)
    data = {"gguf_model": gguf_path, "mmproj_model": mmproj_path, "omni_model": omni_path, "memory_budget_mb": 12000}
    result = await hass.config_entries.flow.async_configure(flow_id, data)
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"] == {**data, "placement": "in_process"}
    await hass.async_block_till_done()
    entry = hass.config_entries.async_entries(DOMAIN)[0]
    assert entry.state is config_entries.ConfigEntryState.LOADED
    assert await hass.config_entries.async_unload(entry.entry_id)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("gguf_model", "/nonexistent/model.gguf", "gguf_not_found"),
        ("gguf_model", "NOT_A_GGUF", "gguf_invalid"),
        ("gguf_model", "WRONG_ARCH", "gguf_architecture"),
        ("mmproj_model", "/nonexistent/mmproj.gguf", "mmproj_not_found"),
        ("mmproj_model", "TEXT_GGUF", "mmproj_invalid"),
        ("mmproj_model", "OTHER_MODEL_MMPROJ", "mmproj_mismatch"),
        ("mmproj_model", "NO_ENCODER", "mmproj_invalid"),
        ("omni_model", "/nonexistent/omni", "omni_not_found"),
        ("omni_model", "NOT_OMNI", "omni_invalid"),
    ],
)
async def test_user_flow_errors_then_recovers(
    hass: HomeAssistant, tmp_path: Path, gguf_path: str, mmproj_path: str, field: str, value: str, error: str
) -> None:
    """Each bad value gets its own error; fixing it completes the flow."""
    from devtools.tiny_gguf import write_tiny_gguf

    if value == "NOT_A_GGUF":
        (tmp_path / "x.gguf").write_bytes(b"JPEG....")
        value = str(tmp_path / "x.gguf")
    elif value == "WRONG_ARCH":
        value = str(write_tiny_gguf(tmp_path / "llama.gguf", arch="llama"))
    elif value == "TEXT_GGUF":
        value = gguf_path
    elif value == "OTHER_MODEL_MMPROJ":  # a mmproj projecting to width 64, for a 32-wide text model
        data_gguf = str(write_tiny_gguf(tmp_path / "narrow.gguf", n_embd=32, n_head=2, n_head_kv=1, n_ff=64))
        gguf_path, value = data_gguf, mmproj_path
    elif value == "NO_ENCODER":
        import gguf

        writer = gguf.GGUFWriter(str(tmp_path / "empty-mmproj.gguf"), "clip")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        value = str(tmp_path / "empty-mmproj.gguf")
    elif value == "NOT_OMNI":
        (tmp_path / "omni").mkdir()
        (tmp_path / "omni" / "config.json").write_text('{"model_type": "llama"}')
        value = str(tmp_path / "omni")
    data = {"gguf_model": gguf_path, "memory_budget_mb": 12000, field: value}
    flow_id = await _start(hass)
    result = await hass.config_entries.flow.async_configure(flow_id, data)
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {field: error}
    data.pop(field) if field != "gguf_model" else data.update(gguf_model=gguf_path)
    result = await hass.config_entries.flow.async_configure(flow_id, data)
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    assert await hass.config_entries.async_unload(hass.config_entries.async_entries(DOMAIN)[0].entry_id)


async def test_solar_url_errors(hass: HomeAssistant, gguf_path: str, solar) -> None:
    """cannot_connect, invalid_auth and not_openai are separate errors."""
    flow_id = await _start(hass)
    base = {"gguf_model": gguf_path, "memory_budget_mb": 12000}
    result = await hass.config_entries.flow.async_configure(flow_id, {**base, "solar_url": "http://127.0.0.1:1/v1"})
    assert result["errors"] == {"solar_url": "cannot_connect"}
    solar.api_key = "good"
    result = await hass.config_entries.flow.async_configure(
        flow_id, {**base, "solar_url": solar.url, "solar_api_key": "bad"}
    )
    assert result["errors"] == {"solar_api_key": "invalid_auth"}
    result = await hass.config_entries.flow.async_configure(
        flow_id, {**base, "solar_url": solar.url.replace("/v1", "/v1/chat"), "solar_api_key": "good"}
    )
    assert result["errors"] == {"solar_url": "cannot_connect"}
    result = await hass.config_entries.flow.async_configure(
        flow_id, {**base, "solar_url": solar.url, "solar_api_key": "good"}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    assert await hass.config_entries.async_unload(hass.config_entries.async_entries(DOMAIN)[0].entry_id)


async def test_single_instance(hass: HomeAssistant, make_entry) -> None:
    """A second entry aborts."""
    make_entry().add_to_hass(hass)
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": config_entries.SOURCE_USER})
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"


async def test_options_flow(hass: HomeAssistant, make_entry) -> None:
    """The engine's options are saved and the entry reloads; the assistants' settings are not among them."""
    entry = make_entry()
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    result = await hass.config_entries.options.async_init(entry.entry_id)
    assert result["type"] is FlowResultType.FORM
    fields = {str(key) for key in result["data_schema"].schema}
    assert {"prompt", "temperature", "llm_hass_api"}.isdisjoint(fields)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"],
        {
            "context_size": 1024,
            "threads": 1,
            "warmup": True,
            "idle_unload_minutes": 5,
            "routing_mode": "local",
            "voice": "Ethan",
        },
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    assert entry.options["voice"] == "Ethan"
    assert entry.runtime_data.engine.text.n_threads == 1
    assert entry.state is config_entries.ConfigEntryState.LOADED
    assert await hass.config_entries.async_unload(entry.entry_id)


OMNI_MODULES = ("torch", "torchvision", "transformers")


class Packages:
    """torch, torchvision and transformers made missing (``sys.modules[name] = None``: an import fails and
    nothing finds them), and put back as an install would; what Home Assistant's requirements machinery was
    asked to install is recorded (the real machinery runs: the pinned versions are installed here, so pip is
    not started)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import sys

        from custom_components.sarai import requirements

        self._monkeypatch = monkeypatch
        self._saved = {name: sys.modules.get(name) for name in OMNI_MODULES}
        self.asked: list[list[str]] = []
        self.installs = True  # False: the install fails (no wheel for this platform)
        real = requirements.async_process_requirements

        async def record(hass: HomeAssistant, name: str, reqs: list[str], *args: Any) -> None:
            from homeassistant.requirements import RequirementsNotFound

            self.asked.append(list(reqs))
            if not self.installs:
                raise RequirementsNotFound(name, list(reqs))
            await real(hass, name, reqs, *args)
            self.restore()

        monkeypatch.setattr(requirements, "async_process_requirements", record)
        for name in OMNI_MODULES:
            monkeypatch.setitem(sys.modules, name, None)

    def restore(self) -> None:
        """The packages are there again (the modules already imported by other tests are reused: torch cannot
        be imported twice in one process)."""
        import sys

        for name, module in self._saved.items():
            if module is not None:
                self._monkeypatch.setitem(sys.modules, name, module)
            else:
                self._monkeypatch.delitem(sys.modules, name, raising=False)


async def _omni_form(hass: HomeAssistant, gguf_path: str, omni_path: str) -> dict[str, Any]:
    form = await start_flow(hass, "worker")
    return await hass.config_entries.flow.async_configure(
        form["flow_id"], {"gguf_model": gguf_path, "omni_model": omni_path, "memory_budget_mb": 12000}
    )


async def test_omni_checkpoint_installs_torch_and_transformers(
    hass: HomeAssistant, gguf_path: str, omni_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Omni checkpoint without torch/transformers: the install step asks Home Assistant's requirements
    machinery for the pinned torch, torchvision and transformers (llama-cpp-python is there), then creates the
    entry, which sets up; nothing was imported in Home Assistant's process to find out."""
    from custom_components.sarai.const import OMNI_REQUIREMENTS

    packages = Packages(monkeypatch)
    result = await _omni_form(hass, gguf_path, omni_path)
    assert result["type"] is FlowResultType.SHOW_PROGRESS and result["progress_action"] == "install_omni"
    assert result["description_placeholders"] == {"packages": "torch, torchvision, transformers"}
    await hass.async_block_till_done()
    result = await hass.config_entries.flow.async_configure(result["flow_id"])
    assert result["type"] is FlowResultType.CREATE_ENTRY and result["data"]["omni_model"] == omni_path
    assert packages.asked == [list(OMNI_REQUIREMENTS)]
    await hass.async_block_till_done()
    entry = hass.config_entries.async_entries(DOMAIN)[0]
    assert entry.state is config_entries.ConfigEntryState.LOADED
    assert "speak" in entry.runtime_data.engine.capabilities
    assert await hass.config_entries.async_unload(entry.entry_id)


@pytest.mark.parametrize("musl", [False, True])
async def test_omni_install_failure_points_to_the_server(
    hass: HomeAssistant, gguf_path: str, omni_path: str, monkeypatch: pytest.MonkeyPatch, musl: bool
) -> None:
    """PyTorch cannot be installed (no wheel; on musl it is not even tried): the flow ends in install_failed,
    whose translated reason points to the server placement and the add-on, and to leaving the Omni
    checkpoint out; no entry is created."""
    import json

    from custom_components.sarai import requirements

    packages = Packages(monkeypatch)
    packages.installs = False
    monkeypatch.setattr(requirements, "is_musl", lambda: musl)
    result = await _omni_form(hass, gguf_path, omni_path)
    assert result["type"] is FlowResultType.SHOW_PROGRESS
    await hass.async_block_till_done()
    result = await hass.config_entries.flow.async_configure(result["flow_id"])
    assert result["type"] is FlowResultType.ABORT and result["reason"] == "install_omni_failed"
    assert result["description_placeholders"] == {"packages": "torch, torchvision, transformers"}
    assert packages.asked == ([] if musl else [["torch==2.15.0", "torchvision==0.29.2", "transformers==5.24.0"]])
    assert not hass.config_entries.async_entries(DOMAIN)
    for lang in ("en", "es"):
        text = json.loads(
            (Path(__file__).parent.parent / f"custom_components/sarai/translations/{lang}.json").read_text()
        )
        reason = text["config"]["abort"]["install_omni_failed"]
        assert "SARAi" in reason and "Omni" in reason and "{packages}" in reason


async def test_reconfigure_adding_an_omni_checkpoint_installs_it(
    hass: HomeAssistant, make_entry, omni_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reconfiguring an entry to add the Omni checkpoint goes through the same install step; the entry is
    updated once the packages are there, and left alone when they cannot be installed."""
    entry = make_entry()
    entry.add_to_hass(hass)
    data = {"gguf_model": entry.data["gguf_model"], "omni_model": omni_path, "memory_budget_mb": 12000}
    packages = Packages(monkeypatch)
    packages.installs = False
    flow = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": "reconfigure", "entry_id": entry.entry_id}
    )
    result = await hass.config_entries.flow.async_configure(flow["flow_id"], data)
    await hass.async_block_till_done()
    result = await hass.config_entries.flow.async_configure(result["flow_id"])
    assert result["type"] is FlowResultType.ABORT and result["reason"] == "install_omni_failed"
    assert "omni_model" not in entry.data
    packages.installs = True
    flow = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": "reconfigure", "entry_id": entry.entry_id}
    )
    result = await hass.config_entries.flow.async_configure(flow["flow_id"], data)
    assert result["type"] is FlowResultType.SHOW_PROGRESS and result["progress_action"] == "install_omni"
    await hass.async_block_till_done()
    result = await hass.config_entries.flow.async_configure(result["flow_id"])
    assert result["type"] is FlowResultType.ABORT and result["reason"] == "reconfigure_successful"
    assert entry.data["omni_model"] == omni_path and entry.data["placement"] == "in_process"


async def test_setup_installs_a_missing_omni_package_once(
    hass: HomeAssistant, make_entry, omni_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry whose Omni packages went missing (a Home Assistant update replaced its venv): setup installs
    them through the same machinery before building the engine; when that fails, setup fails with the
    translated dependency_missing error (never an ImportError at the first turn); a later setup tries again."""
    packages = Packages(monkeypatch)
    packages.installs = False
    entry = make_entry({"omni_model": omni_path})
    entry.add_to_hass(hass)
    assert not await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is config_entries.ConfigEntryState.SETUP_ERROR
    assert entry.error_reason_translation_key == "dependency_missing"
    assert entry.error_reason_translation_placeholders == {"package": "torch"}
    assert len(packages.asked) == 1
    packages.installs = True
    assert await hass.config_entries.async_reload(entry.entry_id)
    assert entry.state is config_entries.ConfigEntryState.LOADED
    assert len(packages.asked) == 2
    assert await hass.config_entries.async_unload(entry.entry_id)
