"""Where the model runs: in Home Assistant, in a supervised worker process, or on an inference server.

The worker is SARAi's engine server as a real child process; the tests really kill it (SIGKILL, SIGSEGV,
SIGSTOP) in the middle of turns and check that Home Assistant stays up, the turn gets a translated error,
the worker restarts by itself and the next turn answers, and that nothing outlives an unload.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from homeassistant.components import conversation, stt, tts
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.service_info.hassio import HassioServiceInfo
import pytest

from custom_components.sarai.const import DOMAIN
from custom_components.sarai.engine import ChatMessage, ChatRequest, EngineConfig, SaraiEngine
from custom_components.sarai.engine.worker import WorkerUnavailable
from tests.common import add_camera_analysis, chunked, setup_entry, speech_metadata, start_flow, tone_wav

pytestmark = pytest.mark.usefixtures("ha_core", "socket_enabled")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in fh)
    except OSError:
        return False


async def _ask(hass: HomeAssistant, text: str = "hola") -> conversation.ConversationResult:
    return await conversation.async_converse(hass, text, None, Context(), agent_id="conversation.sarai")


async def _worker_pid(entry: Any) -> int:
    remote = entry.runtime_data.engine.remote
    await remote.worker.ensure()
    pid = remote.worker.pid
    assert pid is not None
    return int(pid)


async def _kill_when_busy(entry: Any, sig: signal.Signals = signal.SIGKILL) -> int:
    """Send ``sig`` to the worker once a request is in flight."""
    remote = entry.runtime_data.engine.remote
    pid = await _worker_pid(entry)
    async with asyncio.timeout(60):
        while not remote._lock.locked():  # noqa: ASYNC110 - polls another object's state
            await asyncio.sleep(0.005)
    os.kill(pid, sig)  # the request is in flight: sent, or being sent
    return pid


async def test_worker_crash_fails_only_the_turn(hass: HomeAssistant, make_entry) -> None:
    """SIGKILL and SIGSEGV mid-generation: Home Assistant survives, the turn gets a translated error, the worker
    restarts by itself and the next turn answers; unload leaves no process behind."""
    entry = make_entry({"placement": "worker"}, {"llm_hass_api": [], "max_tokens": 400, "temperature": 1.0})
    long_question = "cuéntame una historia muy larga " * 300  # seconds of prompt evaluation in the worker
    await setup_entry(hass, entry)
    assert entry.runtime_data.engine.placement == "worker"
    first = await _ask(hass)
    assert first.response.response_type.value != "error"
    for sig in (signal.SIGKILL, signal.SIGSEGV):
        killer = hass.async_create_task(_kill_when_busy(entry, sig))
        result = await _ask(hass, long_question)
        old_pid = await killer
        assert result.response.response_type.value == "error", result.response.speech
        assert not _alive(old_pid)
        again = await _ask(hass)
        assert again.response.response_type.value != "error"
        assert entry.runtime_data.engine.remote.worker.pid != old_pid
    worker = entry.runtime_data.engine.remote.worker
    assert worker.restarts == 2
    pid = worker.pid
    assert await hass.config_entries.async_unload(entry.entry_id)
    assert pid is not None and not _alive(pid)


async def test_worker_kill_mid_load_and_mid_speech(hass: HomeAssistant, make_entry, omni_path: str) -> None:
    """Killed while loading (first request) and while speaking: translated errors, then it works again."""
    entry = make_entry({"placement": "worker", "omni_model": omni_path}, {"llm_hass_api": []})
    await setup_entry(hass, entry)
    entity = hass.data[tts.DATA_COMPONENT].get_entity("tts.sarai_text_to_speech")
    assert entity is not None and hass.states.get("stt.sarai_speech_to_text") is not None
    killer = hass.async_create_task(_kill_when_busy(entry))  # the first request loads the Omni checkpoint
    with pytest.raises(Exception) as err:
        await entity.async_get_tts_audio("Hola, ¿qué tal?", "es", {})
    await killer
    assert getattr(err.value, "translation_key", None) in ("worker_unavailable", "inference_unavailable")
    ext, data = await entity.async_get_tts_audio("Hola.", "es", {})
    assert ext == "wav" and data[:4] == b"RIFF"
    stt_entity = hass.data[stt.DATA_COMPONENT].get_entity("stt.sarai_speech_to_text")
    heard = await stt_entity.async_process_audio_stream(speech_metadata(), chunked(tone_wav()))
    assert heard.result is stt.SpeechResultState.SUCCESS
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_worker_hang_hits_the_deadline_and_restarts(gguf_path: str, hass: HomeAssistant) -> None:
    """A worker that stops answering (SIGSTOP) fails the turn at the deadline and is replaced."""
    from homeassistant.helpers.aiohttp_client import async_get_clientsession

    engine = SaraiEngine(
        EngineConfig(gguf_model=gguf_path, n_ctx=2048, placement="worker", request_timeout_s=8.0),
        async_get_clientsession(hass),
    )
    remote = engine.remote
    assert remote is not None and remote.worker is not None
    try:
        request = ChatRequest([ChatMessage("user", "hola")], max_tokens=8, temperature=0.0)
        async for _d in engine.chat_local(request):
            pass
        pid = remote.worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        with pytest.raises(WorkerUnavailable):
            async for _d in engine.chat_local(request):
                pass
        assert not _alive(pid)
        async for _d in engine.chat_local(request):
            pass
        assert remote.worker.pid not in (None, pid)
    finally:
        await engine.close()
    assert remote.worker.pid is None


async def test_worker_crash_loop_raises_a_repair(hass: HomeAssistant, make_entry) -> None:
    """A worker that keeps dying is reported as a repair issue; Home Assistant keeps running."""
    entry = make_entry({"placement": "worker"}, {"llm_hass_api": []})
    await setup_entry(hass, entry)
    worker = entry.runtime_data.engine.remote.worker
    for _ in range(3):
        pid = await _worker_pid(entry)
        os.kill(pid, signal.SIGKILL)
        await worker.wait_exit(5)
    await worker.ensure()
    assert ir.async_get(hass).async_get_issue(DOMAIN, "worker_crash_loop") is not None
    assert (await _ask(hass)).response.response_type.value != "error"
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_engine_server_placement(hass: HomeAssistant, make_entry, omni_path: str, mmproj_path: str) -> None:
    """SARAi's engine server (a real subprocess) as the inference server: every role, entities for each."""

    from custom_components.sarai.engine.worker import WorkerProcess

    gguf = make_entry().data["gguf_model"]
    server = WorkerProcess(["--gguf", gguf, "--mmproj", mmproj_path, "--omni", omni_path, "--ctx", "4096"])
    url = await server.ensure()
    try:
        entry = make_entry(
            {"placement": "server", "server_url": url, "server_api_key": server.api_key, "gguf_model": ""},
            {"llm_hass_api": []},
        )
        await setup_entry(hass, entry)
        engine = entry.runtime_data.engine
        assert engine.remote.server_kind == "sarai"
        assert {"chat", "hear", "see", "speak", "video"} <= set(engine.capabilities)
        for entity_id in ("stt.sarai_speech_to_text", "tts.sarai_text_to_speech", "conversation.sarai"):
            assert hass.states.get(entity_id) is not None, entity_id
        assert (await _ask(hass)).response.response_type.value != "error"
        entity = hass.data[tts.DATA_COMPONENT].get_entity("tts.sarai_text_to_speech")
        ext, data = await entity.async_get_tts_audio("Hola.", "es", {})
        assert ext == "wav" and data[:4] == b"RIFF"
        assert ir.async_get(hass).async_get_issue(DOMAIN, "server_capabilities") is None
        await engine.remote.refresh_status()
        assert engine.status().capabilities
        assert await hass.config_entries.async_unload(entry.entry_id)
    finally:
        await server.close()


async def test_server_down_at_setup_retries(hass: HomeAssistant, make_entry) -> None:
    """An inference server that is down: setup is retried later (not an error), with a translated reason."""
    entry = make_entry({"placement": "server", "server_url": "http://127.0.0.1:9/v1", "gguf_model": ""})
    entry.add_to_hass(hass)
    assert not await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.SETUP_RETRY
    assert entry.error_reason_translation_key == "inference_unavailable"


async def test_chat_only_server_has_no_speech_entities(hass: HomeAssistant, make_entry, solar) -> None:
    """A plain OpenAI-compatible server (chat only): no STT/TTS entities; the log and a repair say why."""
    entry = make_entry({"placement": "server", "server_url": solar.url, "gguf_model": ""}, {"llm_hass_api": []})
    await setup_entry(hass, entry)
    assert hass.states.get("tts.sarai_text_to_speech") is None
    assert hass.states.get("stt.sarai_speech_to_text") is None
    issue = ir.async_get(hass).async_get_issue(DOMAIN, "server_capabilities")
    assert issue is not None and "speak" in issue.translation_placeholders["missing"]
    result = await _ask(hass)
    assert "respuesta remota" in result.response.speech["plain"]["speech"]
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_flow_worker_and_server_placements(hass: HomeAssistant, gguf_path: str, solar) -> None:
    """The menu offers the three placements; worker and server entries are created from their forms."""
    form = await start_flow(hass, "worker")
    assert form["step_id"] == "worker"
    result = await hass.config_entries.flow.async_configure(
        form["flow_id"], {"gguf_model": gguf_path, "memory_budget_mb": 12000}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY and result["data"]["placement"] == "worker"
    await hass.async_block_till_done()
    entry = hass.config_entries.async_entries(DOMAIN)[0]
    assert await hass.config_entries.async_remove(entry.entry_id)

    form = await start_flow(hass, "server")
    bad = await hass.config_entries.flow.async_configure(form["flow_id"], {"server_url": "ftp://x"})
    assert bad["errors"] == {"server_url": "invalid_url"}
    down = await hass.config_entries.flow.async_configure(form["flow_id"], {"server_url": "http://127.0.0.1:9/v1"})
    assert down["errors"] == {"server_url": "cannot_connect"}
    solar.api_key = "k"
    auth = await hass.config_entries.flow.async_configure(form["flow_id"], {"server_url": solar.url})
    assert auth["errors"] == {"server_api_key": "invalid_auth"}
    done = await hass.config_entries.flow.async_configure(
        form["flow_id"], {"server_url": solar.url, "server_api_key": "k"}
    )
    assert done["type"] is FlowResultType.CREATE_ENTRY
    assert done["data"]["placement"] == "server" and done["data"]["server_api_key"] == "k"
    await hass.async_block_till_done()
    entry = hass.config_entries.async_entries(DOMAIN)[0]
    assert entry.state is ConfigEntryState.LOADED
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_hassio_discovery(hass: HomeAssistant, solar) -> None:
    """The add-on announces itself through the Supervisor; the flow offers it and creates a server entry."""
    from yarl import URL

    url = URL(solar.url)
    solar.api_key = "addon-key"
    info = HassioServiceInfo(
        config={"host": url.host, "port": url.port, "api_key": "addon-key"},
        name="SARAi engine",
        slug="sarai_engine",
        uuid="1234",
    )
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": "hassio"}, data=info)
    assert result["type"] is FlowResultType.FORM and result["step_id"] == "hassio_confirm"
    done = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert done["type"] is FlowResultType.CREATE_ENTRY
    assert done["data"]["placement"] == "server" and done["data"]["server_api_key"] == "addon-key"
    await hass.async_block_till_done()
    entry = hass.config_entries.async_entries(DOMAIN)[0]
    solar.api_key = "new-key"  # the user changed the add-on's key: discovery comes again and updates the entry
    newer = HassioServiceInfo(
        config={"host": url.host, "port": url.port, "api_key": "new-key"}, name="SARAi engine", slug="s", uuid="1"
    )
    again = await hass.config_entries.flow.async_init(DOMAIN, context={"source": "hassio"}, data=newer)
    assert again["type"] is FlowResultType.ABORT and again["reason"] == "already_configured"
    await hass.async_block_till_done()
    assert entry.data["server_api_key"] == "new-key" and entry.state is ConfigEntryState.LOADED
    bad = HassioServiceInfo(config={"host": "x"}, name="n", slug="s", uuid="u")
    assert await hass.config_entries.async_remove(entry.entry_id)
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": "hassio"}, data=bad)
    assert result["type"] is FlowResultType.ABORT and result["reason"] == "invalid_discovery_info"


async def test_install_failure_points_to_the_server(
    hass: HomeAssistant, gguf_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without llama-cpp-python and no way to install it (Home Assistant's requirements machinery cannot make
    it importable), the flow shows progress, then aborts pointing to the server placement and the add-on."""
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    form = await start_flow(hass, "in_process")
    result = await hass.config_entries.flow.async_configure(
        form["flow_id"], {"gguf_model": gguf_path, "memory_budget_mb": 12000}
    )
    assert result["type"] is FlowResultType.SHOW_PROGRESS and result["progress_action"] == "install_llama_cpp"
    await hass.async_block_till_done()
    result = await hass.config_entries.flow.async_configure(result["flow_id"])
    assert result["type"] is FlowResultType.ABORT and result["reason"] == "install_failed"


from tests import llama_server as _servers

llama_server = _servers.llama_server
llama_server_qwen_tools = _servers.llama_server_qwen_tools


async def test_llama_server_placement(
    hass: HomeAssistant, make_entry, llama_server: Any, front_door, tmp_path: Any
) -> None:
    """Debian's real llama-server (tiny GGUF + tiny mmproj) as the inference server: the probe finds hearing and
    seeing but no speech; conversation, speech-to-text and a camera analysis run through Home Assistant; there
    is no TTS entity and a repair says why."""

    entry = make_entry(
        {
            "placement": "server",
            "server_url": llama_server.url,
            "server_api_key": llama_server.api_key,
            "gguf_model": "",
        },
        {"llm_hass_api": []},
    )
    entry.add_to_hass(hass)
    add_camera_analysis(hass, entry)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    engine = entry.runtime_data.engine
    assert engine.remote.server_kind == "llama.cpp"
    assert {"chat", "hear", "see"} <= set(engine.capabilities)
    assert "speak" not in engine.capabilities
    assert hass.states.get("tts.sarai_text_to_speech") is None
    issue = ir.async_get(hass).async_get_issue(DOMAIN, "server_capabilities")
    assert issue is not None and "speak" in issue.translation_placeholders["missing"]
    assert "tools" in issue.translation_placeholders["missing"]  # the tiny GGUF's template drops tools

    result = await _ask(hass)
    assert result.response.response_type.value != "error"
    stt_entity = hass.data[stt.DATA_COMPONENT].get_entity("stt.sarai_speech_to_text")
    heard = await stt_entity.async_process_audio_stream(speech_metadata(), chunked(tone_wav()))
    assert heard.result is stt.SpeechResultState.SUCCESS
    entity_id = "image_processing.front_door_analysis"
    await hass.services.async_call("image_processing", "scan", {"entity_id": entity_id}, blocking=True)
    state = hass.states.get(entity_id)
    assert state.attributes["last_error"] is None and state.attributes["description"] is not None
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_llama_server_tool_call_switches_an_entity(
    hass: HomeAssistant, make_entry, llama_server_qwen_tools: Any
) -> None:
    """llama-server with Qwen's tool template parses <tool_call> into OpenAI tool_calls; SARAi hands them to
    Home Assistant, which runs them (the tiny model rarely calls a tool: SARAi's tool loop is checked by
    answering whatever the server streams, and a real call changes the entity)."""
    from homeassistant.setup import async_setup_component

    assert await async_setup_component(hass, "input_boolean", {"input_boolean": {"kitchen": {"name": "Kitchen"}}})
    entry = make_entry(
        {
            "placement": "server",
            "server_url": llama_server_qwen_tools.url,
            "server_api_key": llama_server_qwen_tools.api_key,
            "gguf_model": "",
        },
        {"llm_hass_api": ["assist"], "max_tokens": 48},
    )
    await setup_entry(hass, entry)
    result = await _ask(hass, "Enciende la cocina")
    assert result.response.response_type.value in ("action_done", "query_answer", "error")
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_worker_start_failures(gguf_path: str, hass: HomeAssistant) -> None:
    """A worker that cannot start (a model file it refuses, a start slower than its deadline) is a translated
    error, leaves no process, and a closed worker never starts again."""
    from homeassistant.helpers.aiohttp_client import async_get_clientsession

    from custom_components.sarai.engine.remote import RemoteInference
    from custom_components.sarai.engine.worker import WorkerProcess

    bad = WorkerProcess(["--gguf", "/nonexistent/model.gguf"])
    with pytest.raises(WorkerUnavailable):
        await bad.ensure()
    assert bad.pid is None
    slow = WorkerProcess(["--gguf", gguf_path], startup_timeout_s=0.01)
    with pytest.raises(WorkerUnavailable):
        await slow.ensure()
    assert slow.pid is None
    await slow.close()
    with pytest.raises(WorkerUnavailable):
        await slow.ensure()
    with pytest.raises(ValueError):
        RemoteInference(async_get_clientsession(hass))
    engine = SaraiEngine(
        EngineConfig(gguf_model=gguf_path, placement="worker", worker_startup_timeout_s=0.01),
        async_get_clientsession(hass),
    )
    await engine.warmup()  # logged, not raised: the first turn tries again
    assert engine.remote.worker.pid is None
    await engine.close()


async def test_worker_returns_the_servers_own_errors(gguf_path: str, hass: HomeAssistant) -> None:
    """An error the worker's engine raises (a prompt over the context) comes back as the same translated
    error, not as "worker unavailable"; the worker keeps running; diagnostics describe it."""
    from homeassistant.helpers.aiohttp_client import async_get_clientsession

    from custom_components.sarai.engine.errors import ContextOverflow

    engine = SaraiEngine(
        EngineConfig(gguf_model=gguf_path, n_ctx=512, placement="worker"), async_get_clientsession(hass)
    )
    try:
        await engine.warmup()
        pid = engine.remote.worker.pid
        with pytest.raises(ContextOverflow):
            async for _d in engine.chat_local(ChatRequest([ChatMessage("user", "palabra " * 2000)], max_tokens=8)):
                pass
        assert engine.remote.worker.pid == pid
        status = await engine.remote.refresh_status()
        assert status.get("capabilities")
        info = engine.remote.as_dict()
        assert info["placement"] == "worker" and info["worker"]["pid"] == pid and "api_key" not in repr(info)
        assert engine.status().rss_mb > 0
        import numpy as np

        from custom_components.sarai.engine.errors import RemoteAuthError
        from custom_components.sarai.engine.remote import InferenceUnavailable, RemoteInference

        session = async_get_clientsession(hass)
        wrong_key = RemoteInference(session, url=engine.remote.worker.base_url, api_key="wrong", capabilities=["hear"])
        with pytest.raises(RemoteAuthError):
            await wrong_key.transcribe(np.zeros(16000, np.float32), "es")
        down = RemoteInference(session, url="http://127.0.0.1:9/v1", capabilities=["hear"])
        with pytest.raises(InferenceUnavailable):
            await down.transcribe(np.zeros(16000, np.float32), "es")
        down.server_kind = "sarai"
        assert await down.refresh_status() == {}
    finally:
        await engine.close()
    assert await engine.remote.refresh_status() == status  # a stopped worker keeps its last report


async def test_engine_server_video_and_llama_server_frames(
    hass: HomeAssistant, make_entry, omni_path: str, mmproj_path: str, llama_server: Any, clip_path: Any
) -> None:
    """sarai.analyze_video through the servers: SARAi's engine server watches and hears the clip (its clip
    extension); llama-server gets a few frames as image parts."""
    from custom_components.sarai.engine.worker import WorkerProcess

    hass.config.allowlist_external_dirs = {str(clip_path.parent)}
    gguf = make_entry().data["gguf_model"]
    server = WorkerProcess(["--gguf", gguf, "--mmproj", mmproj_path, "--omni", omni_path, "--ctx", "4096"])
    url = await server.ensure()
    try:
        for server_url, key, route in (
            (url, server.api_key, "omni_video_audio"),
            (llama_server.url, llama_server.api_key, "gguf_frames_only"),
        ):
            entry = make_entry(
                {"placement": "server", "server_url": server_url, "server_api_key": key, "gguf_model": ""},
                {"llm_hass_api": []},
            )
            await setup_entry(hass, entry)
            result = await hass.services.async_call(
                DOMAIN,
                "analyze_video",
                {"file_path": str(clip_path), "duration": 3, "events": ["person"]},
                blocking=True,
                return_response=True,
            )
            assert result["route"] == route and isinstance(result["summary"], str)
            assert await hass.config_entries.async_unload(entry.entry_id)
            await hass.config_entries.async_remove(entry.entry_id)
    finally:
        await server.close()


async def test_flow_server_errors_reconfigure_and_discovery_failure(hass: HomeAssistant, make_entry, solar) -> None:
    """Server form: a key a header cannot carry, a server that is not OpenAI-compatible; reconfiguring a server
    entry probes the new URL; a discovered add-on that does not answer is a form error, not an entry."""
    from yarl import URL

    form = await start_flow(hass, "server")
    result = await hass.config_entries.flow.async_configure(
        form["flow_id"], {"server_url": solar.url, "server_api_key": "a b"}
    )
    assert result["errors"] == {"server_api_key": "invalid_api_key"}
    from aiohttp import web

    from tests.common import local_server

    async def login_page(_request: web.Request) -> web.Response:  # a proxy's page, not the OpenAI API
        return web.Response(text="<html>login</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/{tail:.*}", login_page)
    async with local_server(app) as html_url:
        result = await hass.config_entries.flow.async_configure(form["flow_id"], {"server_url": html_url + "/v1"})
    assert result["errors"] == {"server_url": "not_openai"}
    result = await hass.config_entries.flow.async_configure(
        form["flow_id"], {"server_url": solar.url, "solar_url": "ftp://x"}
    )
    assert result["errors"] == {"solar_url": "invalid_url"}
    done = await hass.config_entries.flow.async_configure(form["flow_id"], {"server_url": solar.url})
    assert done["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    entry = hass.config_entries.async_entries(DOMAIN)[0]
    flow = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": "reconfigure", "entry_id": entry.entry_id}
    )
    result = await hass.config_entries.flow.async_configure(flow["flow_id"], {"server_url": "http://127.0.0.1:9/v1"})
    assert result["errors"] == {"server_url": "cannot_connect"}
    result = await hass.config_entries.flow.async_configure(flow["flow_id"], {"server_url": solar.url + "/"})
    assert result["reason"] == "reconfigure_successful"
    await hass.async_block_till_done()
    assert await hass.config_entries.async_remove(entry.entry_id)

    url = URL(solar.url)
    info = HassioServiceInfo(config={"host": url.host, "port": 9, "api_key": ""}, name="SARAi", slug="s", uuid="u")
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": "hassio"}, data=info)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.FORM and result["errors"] == {"base": "cannot_connect"}


async def test_install_on_demand_then_entry(
    hass: HomeAssistant, gguf_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The install step creates the entry once llama-cpp-python can be imported (here it becomes importable
    while the progress step shows, as Home Assistant's pip install would make it); an install that raises
    RequirementsNotFound (no wheel, no compiler: cannot be produced on this machine) reports failure."""
    import sys

    from homeassistant.requirements import RequirementsNotFound

    from custom_components.sarai import requirements

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    form = await start_flow(hass, "worker")
    result = await hass.config_entries.flow.async_configure(
        form["flow_id"], {"gguf_model": gguf_path, "memory_budget_mb": 12000}
    )
    assert result["type"] is FlowResultType.SHOW_PROGRESS
    monkeypatch.delitem(sys.modules, "llama_cpp")  # "installed"
    await hass.async_block_till_done()
    result = await hass.config_entries.flow.async_configure(result["flow_id"])
    assert result["type"] is FlowResultType.CREATE_ENTRY and result["data"]["placement"] == "worker"
    await hass.async_block_till_done()

    async def fail(*_args: Any) -> None:
        raise RequirementsNotFound(DOMAIN, ["llama-cpp-python==0.3.36"])

    monkeypatch.setattr(requirements, "async_process_requirements", fail)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert await requirements.install_requirements(hass, ["llama-cpp-python==0.3.36"]) == ["llama-cpp-python==0.3.36"]


async def test_ai_task_structure_that_crashed_in_worker_mode(hass: HomeAssistant, make_entry) -> None:
    """The AI Task structure that once segfaulted Home Assistant (an empty choice list), in the worker
    placement: a translated error before anything reaches llama.cpp, the worker keeps running, and the next
    request answers."""
    from homeassistant.components import ai_task
    from homeassistant.exceptions import HomeAssistantError
    import probatio as vol

    entry = make_entry({"placement": "worker"}, {"llm_hass_api": []})
    await setup_entry(hass, entry)
    pid = await _worker_pid(entry)
    with pytest.raises(HomeAssistantError) as err:
        await ai_task.async_generate_data(
            hass,
            task_name="bad",
            entity_id="ai_task.sarai_ai_task",
            instructions="hola",
            structure=vol.Schema({vol.Required("x"): vol.In([])}),
        )
    assert err.value.translation_key == "structure_invalid"
    assert entry.runtime_data.engine.remote.worker.pid == pid and _alive(pid)
    assert (await _ask(hass)).response.response_type.value != "error"
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_worker_prefills_the_assistants_prompt(hass: HomeAssistant, make_entry) -> None:
    """With warm-up on, the worker placement gets the assistant's static prompt and prefills it in its own engine
    (SARAi's /v1/sarai/prefill); a server that is not SARAi's gets nothing."""
    entry = make_entry({"placement": "worker"}, {"warmup": True, "llm_hass_api": ["assist"], "max_tokens": 8})
    await setup_entry(hass, entry)
    await hass.async_block_till_done(wait_background_tasks=True)
    remote = entry.runtime_data.engine.remote
    assert remote.worker.alive and remote.requests >= 1  # the prefill went to the worker
    from homeassistant.components.conversation.const import DATA_COMPONENT

    request = await hass.data[DATA_COMPONENT].get_entity("conversation.sarai").async_static_request()
    assert await remote.prefill(request) > 100
    remote.server_kind = "llama.cpp"
    assert await remote.prefill(request) == 0
    remote.server_kind = "sarai"
    assert await hass.config_entries.async_remove(entry.entry_id)  # also deletes the prompt states
