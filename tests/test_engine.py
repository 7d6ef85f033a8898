"""Engine API on the tiny real models: budget, eviction, single-flight, FIFO, cancellation, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from custom_components.sarai.engine import ChatMessage, ChatRequest, EngineConfig, SaraiEngine
from custom_components.sarai.engine.errors import (
    ContextOverflow,
    InsufficientMemory,
    InvalidInput,
    ModelCorrupt,
    ModelMissing,
    UnsupportedModality,
)
from custom_components.sarai.engine.manager import process_rss_bytes
from custom_components.sarai.engine.models import MB, inspect_gguf, inspect_omni, variant_advice
from custom_components.sarai.engine.router import CircuitBreaker, RoutingRules, decide
from custom_components.sarai.engine.tools import ToolCallStreamParser, parse_tool_call, render_chatml
from custom_components.sarai.engine.types import ToolCall, ToolSpec


def _req(text: str = "hola", **kw: object) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage("user", text)], max_tokens=8, temperature=0.0, **kw)  # type: ignore[arg-type]


async def _collect(engine: SaraiEngine, request: ChatRequest) -> str:
    out = ""
    async for delta in engine.chat_local(request):
        out += delta.content
    return out


@pytest.fixture
async def engine(gguf_path: str, omni_path: str):
    eng = SaraiEngine(EngineConfig(gguf_model=gguf_path, omni_model=omni_path, n_ctx=512, omni_dtype="float32"))
    yield eng
    await eng.close()


async def test_chat_streams_and_loads_once(engine: SaraiEngine) -> None:
    """Ten concurrent first requests cause one load (single-flight) and all are answered."""
    results = await asyncio.gather(*(_collect(engine, _req()) for _ in range(10)))
    assert len(results) == 10
    assert engine.manager.backend("text").loads == 1
    status = engine.status()
    assert status.state == "ready"
    assert status.used_estimated_mb >= 0
    assert process_rss_bytes() > 0


async def test_fifo_order(engine: SaraiEngine) -> None:
    """Requests to one backend are served in arrival order."""
    order: list[int] = []

    async def one(i: int) -> None:
        await _collect(engine, _req(f"n {i}"))
        order.append(i)

    await asyncio.gather(*(one(i) for i in range(6)))
    assert order == list(range(6))


async def test_cancel_mid_stream_frees_backend(engine: SaraiEngine) -> None:
    """Cancelling a streaming request frees the backend for the next one."""
    req = ChatRequest(messages=[ChatMessage("user", "cuenta")], max_tokens=400, temperature=1.0)

    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.chat_local(req):
            first.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert isinstance(await asyncio.wait_for(_collect(engine, _req()), 30), str)


async def test_context_overflow(engine: SaraiEngine) -> None:
    """A prompt longer than the context is a clear error, and the next request works."""
    with pytest.raises(ContextOverflow) as err:
        await _collect(engine, _req("palabra " * 600))
    assert err.value.placeholders["n_ctx"] == "512"
    assert isinstance(await _collect(engine, _req()), str)


async def test_json_schema_grammar(engine: SaraiEngine) -> None:
    """Constrained decoding makes even a random model produce the requested structure."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    request = ChatRequest(messages=[ChatMessage("user", "x")], max_tokens=40, temperature=0.0, json_schema=schema)
    text = await _collect(engine, request)
    assert text.lstrip().startswith("{")


async def test_budget_eviction_and_insufficient_memory(gguf_path: str, omni_path: str) -> None:
    """A budget below the sum of two backends forces eviction; below one gives InsufficientMemory."""
    probe = SaraiEngine(EngineConfig(gguf_model=gguf_path, omni_model=omni_path, n_ctx=512, omni_dtype="float32"))
    text_mb = probe.manager.backend("text").estimate_bytes() / MB
    omni_mb = probe.manager.backend("omni").estimate_bytes() / MB
    await probe.close()
    # Once Omni has loaded, torch + transformers stay resident: the text model must fit beside them.
    budget = int(omni_mb + text_mb / 2) + 1
    eng = SaraiEngine(
        EngineConfig(
            gguf_model=gguf_path, omni_model=omni_path, n_ctx=512, omni_dtype="float32", memory_budget_mb=budget
        )
    )
    try:
        await _collect(eng, _req())
        assert eng.manager.backend("text").loaded
        await eng.speak("Hola.", "Chelsie")
        assert eng.manager.backend("omni").loaded
        assert not eng.manager.backend("text").loaded  # evicted
        await _collect(eng, _req())
        assert eng.manager.backend("text").loads == 2
    finally:
        await eng.close()
    tiny = SaraiEngine(EngineConfig(gguf_model=gguf_path, n_ctx=512, memory_budget_mb=1))
    try:
        with pytest.raises(InsufficientMemory) as err:
            await _collect(tiny, _req())
        assert err.value.budget_mb == 1
        assert err.value.needed_mb >= 1
    finally:
        await tiny.close()


async def test_idle_unload_and_warmup(engine: SaraiEngine) -> None:
    """Warm-up preloads; idle unload releases."""
    await engine.warmup()
    assert engine.manager.backend("text").loaded
    await _collect(engine, _req())
    assert await engine.unload_idle(0) == ["text"]
    assert not engine.manager.backend("text").loaded


async def test_hear_see_speak_video(engine: SaraiEngine) -> None:
    """Every modality runs through the tiny Omni checkpoint."""
    t = np.arange(8000 * 2) / 8000
    text = await engine.transcribe((0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 8000, "es")
    assert isinstance(text, str)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, format="JPEG")
    assert isinstance(await engine.describe_image(buf.getvalue(), "¿Qué ves?"), str)
    pcm = await engine.speak("Hola, mundo.", "Ethan")
    assert len(pcm) > 0 and len(pcm) % 2 == 0
    frames = np.random.default_rng(0).integers(0, 255, (8, 112, 112, 3), dtype=np.uint8)
    audio = np.zeros(16000 * 4, dtype=np.float32)
    assert isinstance(await engine.describe_video(frames, 2.0, audio, "¿Qué pasa?"), str)
    shapes = engine.manager.backend("omni").last_video_inputs  # type: ignore[attr-defined]
    assert "pixel_values_videos" in shapes and "input_features" in shapes


async def test_bad_inputs(engine: SaraiEngine) -> None:
    """Empty audio and a non-image are InvalidInput; the next request works."""
    with pytest.raises(InvalidInput):
        await engine.transcribe(np.zeros(0, dtype=np.float32), 16000, "es")
    with pytest.raises(InvalidInput):
        await engine.describe_image(b"not an image", "x")
    assert isinstance(await engine.describe_image(_png(), "x"), str)


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    return buf.getvalue()


async def test_unsupported_modality_without_omni(gguf_path: str) -> None:
    """With only a GGUF, hearing/speaking say what to configure."""
    eng = SaraiEngine(EngineConfig(gguf_model=gguf_path, n_ctx=512))
    try:
        assert eng.capabilities == ["chat"]
        with pytest.raises(UnsupportedModality, match="omni_model"):
            await eng.speak("hola", "Chelsie")
    finally:
        await eng.close()


def test_model_inspection(gguf_path: str, omni_path: str, tmp_path: Path) -> None:
    """Headers are read without loading; bad files are typed errors."""
    info = inspect_gguf(gguf_path)
    assert info.architecture == "qwen2vl"
    assert info.kv_cache_bytes(1024) > 0
    omni = inspect_omni(omni_path)
    assert omni.parameters > omni.thinker_parameters > 0
    with pytest.raises(ModelMissing):
        inspect_gguf(tmp_path / "none.gguf")
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(Path(gguf_path).read_bytes()[:100])
    with pytest.raises(ModelCorrupt):
        inspect_gguf(truncated)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "config.json").write_text('{"model_type": "qwen2_5_omni"}')
    with pytest.raises(ModelMissing, match="spk_dict"):
        inspect_omni(tmp_path / "o")
    assert variant_advice(4680 * MB) == "7B Q4_K_M"
    assert variant_advice(10) == "custom"


async def test_corrupt_gguf_at_load(tmp_path: Path, gguf_path: str) -> None:
    """A file that passes the header check but that llama.cpp refuses (a required tensor renamed) is
    ModelCorrupt at load; so is a file truncated after the engine was built (the layout is checked again)."""
    data = Path(gguf_path).read_bytes()
    assert data.count(b"token_embd.weight") == 1
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data.replace(b"token_embd.weight", b"token_embd.weighX"))
    eng = SaraiEngine(EngineConfig(gguf_model=str(bad), n_ctx=512))
    try:
        with pytest.raises(ModelCorrupt):
            await _collect(eng, _req())
    finally:
        await eng.close()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data)
    eng = SaraiEngine(EngineConfig(gguf_model=str(cut), n_ctx=512))
    cut.write_bytes(data[: len(data) // 2])
    try:
        with pytest.raises(ModelCorrupt) as err:
            await _collect(eng, _req())
        assert err.value.translation_key == "model_truncated"
    finally:
        await eng.close()


def test_tool_call_parsing() -> None:
    """Qwen <tool_call> blocks are parsed from a stream split anywhere."""
    text = 'Vale. <tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "cocina"}}\n</tool_call> Hecho.'
    for step in (1, 3, 7, len(text)):
        parser = ToolCallStreamParser()
        content, calls = "", []
        for i in range(0, len(text), step):
            d = parser.feed(text[i : i + step])
            content += d.content
            calls += d.tool_calls
        tail = parser.finish()
        content += tail.content
        assert [c.name for c in calls] == ["HassTurnOn"]
        assert calls[0].arguments == {"name": "cocina"}
        assert content == "Vale.  Hecho."
    assert parse_tool_call("not json") is None
    assert parse_tool_call('```json\n{"name": "x", "arguments": "{\\"a\\": 1}"}\n```').arguments == {"a": 1}  # type: ignore[union-attr]
    unterminated = ToolCallStreamParser()
    unterminated.feed('<tool_call>{"name": "y", "arguments": {}}')
    assert [c.name for c in unterminated.finish().tool_calls] == ["y"]
    prompt = render_chatml(
        [
            ChatMessage("user", "hola"),
            ChatMessage("assistant", "", tool_calls=[ToolCall("1", "f", {})]),
            ChatMessage("tool", "{}"),
        ],
        [ToolSpec("f", "does f", {"type": "object"})],
    )
    assert "<tools>" in prompt and "<tool_response>" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_router_rules() -> None:
    """Heavy reasoning goes remote in auto; device control stays local."""
    rules = RoutingRules()
    assert decide("enciende la luz de la cocina", "auto", rules, True).route == "local"
    assert decide("¿qué hora es?", "auto", rules, True).route == "local"
    d = decide("piensa: ¿cuál es el sentido de la vida?", "auto", rules, True)
    assert (d.route, d.text) == ("remote", "¿cuál es el sentido de la vida?")
    assert decide("explica por qué el cielo es azul", "auto", rules, True).route == "remote"
    assert decide("calcula el consumo de la semana", "auto", rules, True).route == "remote"
    assert decide("compare these two plans", "auto", rules, True).route == "remote"
    assert decide("palabra " * 80, "auto", rules, True).route == "remote"
    assert decide("primero abre la puerta y luego cierra la ventana", "auto", rules, True).route == "remote"
    assert decide("calcula algo", "local", rules, True).route == "local"
    assert decide("calcula algo", "auto", rules, False).route == "local"
    assert decide("hola", "remote", rules, True).route == "remote"
    assert decide("think: x", "local", rules, True).route == "local"


def test_circuit_breaker() -> None:
    """Opens after N failures, half-opens after the cool-down, closes on success."""
    b = CircuitBreaker(threshold=2, cooldown_s=10)
    assert b.allow(0) and b.state == "closed"
    assert not b.failure("x", now=0)
    assert b.failure("x", now=1)
    assert not b.allow(5)
    assert b.allow(12)
    b.success()
    assert b.state == "closed"
    assert b.as_dict()["failures"] == 0


async def test_engine_decides_and_returns_the_route(engine: SaraiEngine) -> None:
    """The engine decides the route; the caller reads it. A "think:" prefix never reaches the model, and only
    an assistant's turn becomes last_route."""
    from dataclasses import replace

    turn = engine.chat(replace(_req(), messages=[ChatMessage("user", "think: hola")], agent="Casa"))
    async for _d in turn:
        pass
    assert turn.route.route == "local" and "no remote" in turn.route.reason
    assert turn.route.duration_s is not None and turn.route.agent == "Casa"
    assert engine.last_route is turn.route
    assert engine.text.last_prompt_tokens
    prompt = engine.text._llm.detokenize(engine.text.last_prompt_tokens).decode()
    assert "think:" not in prompt and "hola" in prompt
    internal = engine.chat(_req())
    async for _d in internal:
        pass
    assert engine.last_route is turn.route  # internal work (no agent) does not replace it


async def test_gguf_mmproj_hears_and_sees_without_transformers(gguf_path: str, mmproj_path: str, tmp_path) -> None:
    """With GGUF + mmproj only: hearing and seeing run in llama.cpp (libmtmd); speech output is not available."""
    from custom_components.sarai.engine.audio import decode_wav
    from custom_components.sarai.engine.errors import UnsupportedModality
    from devtools.media import make_jpeg, make_speech_wav
    from devtools.tiny_gguf import write_tiny_gguf

    engine = SaraiEngine(EngineConfig(gguf_model=gguf_path, mmproj_model=mmproj_path, n_ctx=4096))
    try:
        assert {"hear", "see", "video_frames"} <= set(engine.capabilities)
        assert "speak" not in engine.capabilities
        assert engine.text.estimate_bytes() > engine.text.info.size_bytes + engine.text.mmproj.size_bytes
        samples, rate = decode_wav(make_speech_wav())
        text = await engine.transcribe(samples, rate, "es")
        assert isinstance(text, str) and text
        # 70 s of audio is heard in three windows (Omni truncates at 30 s).
        long = np.tile(samples, int(70 * rate / samples.size) + 1)[: 70 * rate]
        assert await engine.transcribe(long, rate, "es")
        answer = await engine.describe_image(make_jpeg((96, 64)), "¿Qué ves?", max_tokens=8)
        assert answer
        # The text model still chats after media turns (its KV cache was reset).
        out = [
            d.content
            async for d in engine.chat_local(ChatRequest([ChatMessage("user", "hola")], max_tokens=24, temperature=0.0))
        ]
        assert "".join(out)
        with pytest.raises(UnsupportedModality):
            await engine.speak("hola", "Chelsie")
    finally:
        await engine.close()
    narrow = write_tiny_gguf(tmp_path / "narrow.gguf", n_embd=32, n_head=2, n_head_kv=1, n_ff=64)
    with pytest.raises(ModelCorrupt):
        SaraiEngine(EngineConfig(gguf_model=str(narrow), mmproj_model=mmproj_path))
