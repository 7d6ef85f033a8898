"""SOLAR against two real servers on 127.0.0.1: llama-cpp-python's OpenAI server on the tiny GGUF, and a
scripted aiohttp server for faults (slow first byte, stalled stream, truncated SSE, invalid JSON, wrong
content type, error bodies, DNS failure) and for the circuit breaker's recovery."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
import subprocess
import sys
import time

from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import intent
import pytest

from custom_components.sarai.const import DOMAIN
from tests.common import setup_entry as _setup, start_flow

pytestmark = pytest.mark.usefixtures("ha_core")


def _free_port() -> int:
    # Asked of a child process: the test harness blocks sockets in this one outside tests.
    code = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


@pytest.fixture(scope="module")
def llama_server(models_dir: Path) -> Iterator[str]:
    """`python -m llama_cpp.server` serving the tiny GGUF (a second file, so that it is not the local model)."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(models_dir / "tiny-qwen2.gguf"),
            "--model_alias",
            "solar-tiny",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "16384",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if "Uvicorn running on" in line:
            break
    else:  # pragma: no cover - diagnostics only
        proc.kill()
    if proc.poll() is not None:  # pragma: no cover - diagnostics only
        pytest.fail("llama_cpp.server did not start:\n" + "".join(lines[-30:]))
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover
        proc.kill()
    proc.stdout.close()


async def _ask(hass: HomeAssistant, text: str) -> conversation.ConversationResult:
    return await conversation.async_converse(hass, text, None, Context(), agent_id="conversation.sarai")


async def test_llama_cpp_server_as_solar(hass: HomeAssistant, make_entry, llama_server: str, socket_enabled) -> None:
    """Config flow validates the real server; in auto mode heavy reasoning goes remote, device talk stays local."""
    result = await start_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        {"gguf_model": make_entry().data["gguf_model"], "memory_budget_mb": 12000, "solar_url": llama_server},
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    entry = hass.config_entries.async_entries(DOMAIN)[0]
    hass.config_entries.async_update_entry(
        entry, options={"context_size": 16384, "max_tokens": 16, "temperature": 0.0, "llm_hass_api": []}
    )
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    engine = entry.runtime_data.engine
    heavy = await _ask(hass, "piensa: explica por qué el cielo es azul y compara con el atardecer")
    assert heavy.response.response_type is intent.IntentResponseType.ACTION_DONE
    assert heavy.response.speech["plain"]["speech"]
    assert engine.last_route.route == "remote" and engine.last_route.fallback is None
    assert engine.solar.model == "solar-tiny"
    await hass.async_block_till_done()
    assert hass.states.get("sensor.sarai_last_route").state == "remote"
    light = await _ask(hass, "enciende la luz")
    assert light.response.response_type is intent.IntentResponseType.ACTION_DONE
    assert engine.last_route.route == "local"
    assert await hass.config_entries.async_unload(entry.entry_id)


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ({"status": 500}, "HTTP 500"),
        ({"status": 503}, "HTTP 503"),
        ({"delay": 3}, "Timeout"),
        ({"html": "<html>login</html>"}, "event stream"),
        ({"raw": 'data: {"error": {"message": "model overloaded"}}\n\n'}, "overloaded"),
        ({"raw": "data: {not json\n\n"}, "invalid JSON"),
        ({"raw": ""}, "ended before"),
        ({"raw": 'data: {"choices": []}\n\n'}, "without choices"),
    ],
    ids=["500", "503", "slow-first-byte", "wrong-content-type", "error-body", "invalid-json", "empty", "no-choices"],
)
async def test_remote_faults_before_first_byte_fall_back_local(
    hass: HomeAssistant, make_entry, solar, reply: dict, why: str
) -> None:
    """Each fault before any text streamed: the local model answers, the route says why, the next turn works."""
    entry = make_entry({"solar_url": solar.url}, {"routing_mode": "remote", "llm_hass_api": [], "solar_timeout": 1})
    await _setup(hass, entry)
    engine = entry.runtime_data.engine
    solar.replies = [reply]
    result = await _ask(hass, "hola")
    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
    assert engine.last_route.route == "local"
    assert why in engine.last_route.fallback, engine.last_route.fallback
    solar.replies = [{"text": "de vuelta"}]
    result = await _ask(hass, "hola")
    assert result.response.speech["plain"]["speech"].strip() == "de vuelta"
    assert engine.last_route.route == "remote"
    assert await hass.config_entries.async_unload(entry.entry_id)


@pytest.mark.parametrize(
    "reply",
    [{"stall": 3}, {"raw": 'data: {"choices": [{"index": 0, "delta": {"content": "Medio "}}]}\n\n'}],
    ids=["stalled-stream", "truncated-sse"],
)
async def test_remote_fault_mid_stream_is_a_clear_error(hass: HomeAssistant, make_entry, solar, reply: dict) -> None:
    """After text has streamed the answer is not regenerated elsewhere: a translated error, then the next turn works."""
    entry = make_entry({"solar_url": solar.url}, {"routing_mode": "remote", "llm_hass_api": [], "solar_timeout": 1})
    await _setup(hass, entry)
    solar.replies = [reply]
    result = await _ask(hass, "hola")
    assert result.response.response_type is intent.IntentResponseType.ERROR
    solar.replies = [{"text": "bien"}]
    result = await _ask(hass, "hola")
    assert result.response.speech["plain"]["speech"].strip() == "bien"
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_breaker_opens_then_recovers(hass: HomeAssistant, make_entry, solar) -> None:
    """Three failures open the breaker (no more requests to the dead server); after the cool-down it probes again."""
    entry = make_entry({"solar_url": solar.url}, {"routing_mode": "remote", "llm_hass_api": []})
    await _setup(hass, entry)
    engine = entry.runtime_data.engine
    engine.breaker.cooldown_s = 0.2
    solar.replies = [{"status": 500}] * 3
    for _ in range(3):
        await _ask(hass, "hola")
    assert engine.breaker.state == "open"
    sent = len(solar.requests)
    await _ask(hass, "hola")
    assert len(solar.requests) == sent  # not even tried
    assert engine.last_route.fallback.startswith("circuit breaker open")
    await asyncio.sleep(0.25)
    solar.replies = [{"text": "vuelvo"}]
    result = await _ask(hass, "hola")
    assert result.response.speech["plain"]["speech"].strip() == "vuelvo"
    assert engine.breaker.state == "closed"
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_unresolvable_host_falls_back_local(hass: HomeAssistant, make_entry, socket_enabled) -> None:
    """A DNS failure (or a server that is down) costs one attempt, and the local model answers."""
    entry = make_entry({"solar_url": "http://127.0.0.1:9/v1"}, {"routing_mode": "remote", "llm_hass_api": []})
    await _setup(hass, entry)
    engine = entry.runtime_data.engine
    result = await _ask(hass, "hola")
    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
    assert engine.last_route.fallback.startswith("remote failed")
    assert await hass.config_entries.async_unload(entry.entry_id)
