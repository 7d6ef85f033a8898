"""Fixtures: tiny real models built once per session, a scripted OpenAI-compatible server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
import json
from pathlib import Path
import resource
from typing import Any

from aiohttp import web
from homeassistant.config_entries import ConfigSubentryData
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.sarai.const import DOMAIN
from devtools.tiny_gguf import write_tiny_gguf
from tests.common import local_server


@pytest.fixture(autouse=True)
def auto_enable_custom_integrations(enable_custom_integrations: None) -> None:
    """Load custom_components/sarai in every test."""


@pytest.fixture(autouse=True, scope="session")
def no_prompt_states_left_behind() -> Iterator[None]:
    """Prompt states written under the harness's shared test configuration are removed after the session."""
    import shutil

    from pytest_homeassistant_custom_component.common import get_test_config_dir

    yield
    shutil.rmtree(get_test_config_dir(".cache", DOMAIN), ignore_errors=True)


@pytest.fixture(autouse=True)
def peak_rss_under_budget() -> Iterator[None]:
    """Whatever a test does, the test process never grows past the default 12 GB budget."""
    yield
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert peak_mb < 12000, f"peak RSS {peak_mb:.0f} MB"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny GGUF + tiny Omni checkpoint, built once."""
    from devtools.tiny_mmproj import write_tiny_mmproj
    from devtools.tiny_omni import write_tiny_omni

    root = tmp_path_factory.mktemp("models")
    write_tiny_gguf(root / "tiny.gguf")
    write_tiny_gguf(root / "tiny-qwen2.gguf", arch="qwen2", seed=1)
    write_tiny_omni(root / "omni")
    write_tiny_mmproj(root / "omni", root / "mmproj.gguf")
    return root


@pytest.fixture
def gguf_path(models_dir: Path) -> str:
    """Path of the tiny text GGUF."""
    return str(models_dir / "tiny.gguf")


@pytest.fixture
def omni_path(models_dir: Path) -> str:
    """Path of the tiny Omni checkpoint."""
    return str(models_dir / "omni")


@pytest.fixture
def mmproj_path(models_dir: Path) -> str:
    """Path of the tiny mmproj (audio + vision encoders of the tiny Omni, for the tiny GGUF)."""
    return str(models_dir / "mmproj.gguf")


def agent_subentries(options: dict[str, Any]) -> list[ConfigSubentryData]:
    """The assistants' sub-entries of a version-2 entry: one conversation agent, one AI Task agent."""
    from custom_components.sarai.const import AGENT_OPTION_KEYS

    agent = {k: v for k, v in options.items() if k in AGENT_OPTION_KEYS}
    agent.setdefault("llm_hass_api", ["assist"])
    return [
        ConfigSubentryData(data=dict(agent), subentry_type="conversation", title="SARAi", unique_id=None),
        ConfigSubentryData(data=dict(agent), subentry_type="ai_task_data", title="SARAi AI Task", unique_id=None),
    ]


@pytest.fixture
def make_entry(gguf_path: str) -> Callable[..., MockConfigEntry]:
    """Build a config entry for the tiny models: engine settings in the entry, assistant settings
    (prompt, tools, sampling, routing) in its two assistant sub-entries."""
    from custom_components.sarai.const import AGENT_OPTION_KEYS

    def _make(data: dict[str, Any] | None = None, options: dict[str, Any] | None = None) -> MockConfigEntry:
        merged = {"context_size": 16384, "max_tokens": 24, "temperature": 0.0, **(options or {})}
        return MockConfigEntry(
            domain=DOMAIN,
            title="SARAi",
            unique_id=DOMAIN,
            version=2,
            minor_version=1,
            data={"gguf_model": gguf_path, "memory_budget_mb": 12000, **(data or {})},
            options={k: v for k, v in merged.items() if k not in AGENT_OPTION_KEYS or k == "routing_mode"},
            subentries_data=agent_subentries(merged),
        )

    return _make


class ScriptedSolar:
    """An OpenAI-compatible server on 127.0.0.1 whose answers the test scripts."""

    def __init__(self) -> None:
        self.replies: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.models_status = 200
        self.api_key: str | None = None
        self.url = ""
        self.released = asyncio.Event()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up when the test ends (no handler outlives the test)."""
        try:
            await asyncio.wait_for(self.released.wait(), seconds)
        except TimeoutError:
            pass

    def _auth_ok(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def models(self, request: web.Request) -> web.StreamResponse:
        if not self._auth_ok(request):
            return web.json_response({"error": "bad key"}, status=401)
        if self.models_status != 200:
            return web.Response(status=self.models_status, text="nope")
        return web.json_response({"object": "list", "data": [{"id": "solar-test", "object": "model"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if not self._auth_ok(request):
            return web.json_response({"error": "bad key"}, status=401)
        reply = self.replies.pop(0) if self.replies else {"text": "respuesta remota"}
        if "delay" in reply:  # slow first byte
            await self._sleep(reply["delay"])
        if "status" in reply:
            return web.Response(status=reply["status"], text="server error")
        if "html" in reply:  # 200 with the wrong content type (a proxy's login page)
            return web.Response(status=200, text=reply["html"], content_type="text/html")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj: Any) -> None:
            await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

        if "raw" in reply:
            await resp.write(reply["raw"].encode())
            return resp
        if "stall" in reply:  # one chunk, then silence
            await send({"choices": [{"index": 0, "delta": {"content": "Pensando "}}]})
            await self._sleep(reply["stall"])
            return resp
        if "tool_call" in reply:
            name, args = reply["tool_call"]
            await send(
                {
                    "choices": [
                        {
                            "index": 0,
                            "delta": {
                                "tool_calls": [
                                    {
                                        "index": 0,
                                        "id": "call_1",
                                        "type": "function",
                                        "function": {"name": name, "arguments": json.dumps(args)},
                                    }
                                ]
                            },
                        }
                    ]
                }
            )
            await send({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        else:
            for word in reply["text"].split(" "):
                await send({"choices": [{"index": 0, "delta": {"content": word + " "}}]})
            await send({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def solar(socket_enabled: None) -> AsyncIterator[ScriptedSolar]:
    """Start the scripted server on 127.0.0.1."""
    server = ScriptedSolar()
    app = web.Application()
    app.router.add_get("/v1/models", server.models)
    app.router.add_post("/v1/chat/completions", server.chat)
    async with local_server(app, release=server.released) as url:
        server.url = f"{url}/v1"
        yield server


@pytest.fixture
async def ha_core(hass: Any) -> None:
    """Home Assistant's core integration (exposed entities), which conversation needs."""
    from homeassistant.setup import async_setup_component

    assert await async_setup_component(hass, "homeassistant", {})


@pytest.fixture(scope="session")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 5 s H.264 + AAC clip: a white square from t=2 s, a 1 kHz burst at t=3 s."""
    from devtools.media import make_clip

    return make_clip(tmp_path_factory.mktemp("media") / "door.mp4")


@pytest.fixture
async def front_door(hass: Any, clip_path: Path) -> Any:
    """camera.front_door: JPEG snapshots, and the test clip as its stream source (a local file)."""
    from homeassistant.components.camera import Camera, CameraEntityFeature
    from homeassistant.setup import async_setup_component
    from pytest_homeassistant_custom_component.common import MockPlatform, mock_platform

    from devtools.media import make_jpeg

    class FrontDoor(Camera):
        _attr_name = "Front door"
        _attr_unique_id = "front_door"
        _attr_supported_features = CameraEntityFeature.STREAM
        _attr_should_poll = False

        def __init__(self) -> None:
            super().__init__()
            self.image: bytes | None = make_jpeg((96, 64))
            self.source: str | None = str(clip_path)

        async def async_camera_image(self, width: int | None = None, height: int | None = None) -> bytes | None:
            return self.image

        async def stream_source(self) -> str | None:
            return self.source

    cam = FrontDoor()

    async def setup_platform(hass: Any, config: Any, add_entities: Any, discovery_info: Any = None) -> None:
        add_entities([cam])

    mock_platform(hass, "test.camera", MockPlatform(async_setup_platform=setup_platform))
    assert await async_setup_component(hass, "camera", {"camera": {"platform": "test"}})
    await hass.async_block_till_done()
    return cam
