"""Config, options, reconfigure and reauth flows."""

from __future__ import annotations

from pathlib import Path

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
