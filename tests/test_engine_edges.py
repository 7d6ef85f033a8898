"""Engine edges: queue and stream timeouts, closing with work queued, busy backends that cannot be evicted,
warm-up failures, int8 Omni, image limits, clips cut short or starved."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

from custom_components.sarai.engine import ChatMessage, ChatRequest, EngineConfig, SaraiEngine
from custom_components.sarai.engine.errors import (
    EngineError,
    InsufficientMemory,
    InvalidInput,
    MediaUnavailable,
    RequestTimeout,
)
from custom_components.sarai.engine.media import prepare_clip
from custom_components.sarai.engine.omni_backend import MAX_IMAGE_BYTES, load_image

LONG = ChatRequest([ChatMessage("user", "cuéntame una historia muy larga")], max_tokens=3000, temperature=0.0)


async def _drain(engine: SaraiEngine, request: ChatRequest) -> str:
    out = ""
    async for delta in engine.chat_local(request):
        out += delta.content
    return out


async def _busy(engine: SaraiEngine) -> asyncio.Task[str]:
    task = asyncio.create_task(_drain(engine, LONG))
    for _ in range(500):
        await asyncio.sleep(0.01)
        if engine.text.loaded and engine.manager.status()[0].busy:
            break
    return task


async def test_queue_timeout_stream_timeout_and_close_with_queued_work(gguf_path: str) -> None:
    """A request that waits too long for its backend, or runs too long, times out; closing refuses queued work."""
    engine = SaraiEngine(EngineConfig(gguf_model=gguf_path, n_ctx=4096))
    first = await _busy(engine)
    with pytest.raises(RequestTimeout):
        await engine.manager.call("text", lambda stop: "never", timeout_s=0.05)
    queued = asyncio.create_task(engine.manager.call("text", lambda stop: "late"))
    await asyncio.sleep(0.05)
    await engine.close()
    with pytest.raises(EngineError):
        await queued
    await first  # stopped at its next token by close()
    with pytest.raises(EngineError):
        await engine.manager.call("text", lambda stop: "closed")

    engine = SaraiEngine(EngineConfig(gguf_model=gguf_path, n_ctx=4096))
    try:
        with pytest.raises(RequestTimeout):
            async for _chunk in engine.manager.stream(
                "text", lambda emit, stop: engine.text.chat(LONG, emit, stop), timeout_s=0.3
            ):
                pass
    finally:
        await engine.close()


async def test_busy_backend_is_not_evicted(gguf_path: str, omni_path: str) -> None:
    """With room for one model, a request for the other while the first generates gets InsufficientMemory."""
    probe = SaraiEngine(EngineConfig(gguf_model=gguf_path, omni_model=omni_path, n_ctx=4096))
    budget = (probe.text.estimate_bytes() + probe.manager.backend("omni").estimate_bytes()) // (1024 * 1024) - 1
    engine = SaraiEngine(
        EngineConfig(gguf_model=gguf_path, omni_model=omni_path, n_ctx=4096, memory_budget_mb=max(budget, 1))
    )
    try:
        first = await _busy(engine)
        with pytest.raises(InsufficientMemory) as err:
            await engine.speak("hola", "Chelsie")
        assert err.value.needed_mb >= 0 and err.value.budget_mb == max(budget, 1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    finally:
        await engine.close()


async def test_warmup_failure_is_logged_not_raised(gguf_path: str, caplog) -> None:
    """A warm-up that cannot fit logs a warning; unknown names are ignored."""
    engine = SaraiEngine(EngineConfig(gguf_model=gguf_path, memory_budget_mb=1))
    try:
        await engine.manager.warmup(["nope", "text"])
        assert "Warm-up of text failed" in caplog.text
    finally:
        await engine.close()


async def test_int8_omni_hears(gguf_path: str, omni_path: str) -> None:
    """The int8 dynamic quantisation option loads the thinker quantised and halves the estimate."""
    import numpy as np

    plain = SaraiEngine(EngineConfig(gguf_model=gguf_path, omni_model=omni_path))
    engine = SaraiEngine(EngineConfig(gguf_model=gguf_path, omni_model=omni_path, omni_int8=True))
    try:
        assert engine.manager.backend("omni").estimate_bytes() < plain.manager.backend("omni").estimate_bytes()
        text = await engine.transcribe(np.zeros(16000, np.float32), 16000, "es")
        assert isinstance(text, str)
    finally:
        await engine.close()
        await plain.close()


def test_image_limits() -> None:
    """Over 20 MB and formats other than JPEG/PNG/WebP/GIF/BMP are refused."""
    from PIL import Image

    with pytest.raises(InvalidInput) as err:
        load_image(b"\xff" * (MAX_IMAGE_BYTES + 1))
    assert err.value.translation_key == "image_bytes_too_large" and err.value.placeholders == {"max_mb": "20"}
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    with pytest.raises(InvalidInput, match="unsupported image format"):
        load_image(buf.getvalue())


def test_clip_cut_short_and_starved(clip_path: Path) -> None:
    """Two seconds of a five-second clip stop reading early (video and audio); no time left is MediaUnavailable."""
    clip = prepare_clip(str(clip_path), duration_s=2, fps=2)
    assert clip.frame_times[-1] < 2.0
    assert clip.audio is not None and clip.audio.size <= 2 * 16000
    with pytest.raises(MediaUnavailable):
        prepare_clip(str(clip_path), duration_s=1, fps=2, timeout_s=-5)


async def test_truncated_omni_weights(tmp_path: Path, omni_path: str, gguf_path: str) -> None:
    """Weights cut short are refused when the entry is set up (header check), and at load if cut later."""
    import shutil

    from custom_components.sarai.engine.errors import ModelCorrupt
    from custom_components.sarai.engine.omni_backend import OmniBackend

    broken = tmp_path / "omni"
    shutil.copytree(omni_path, broken)
    weights = next(broken.glob("*.safetensors"))
    good = weights.read_bytes()
    backend = OmniBackend("omni", str(broken))
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelCorrupt, match="truncated"):
        SaraiEngine(EngineConfig(gguf_model=gguf_path, omni_model=str(broken)))
    with pytest.raises(ModelCorrupt):
        backend.load()


async def test_media_chat_edges(gguf_path: str, mmproj_path: str) -> None:
    """A media prompt longer than the context, a system prompt, a stop already requested, no mmproj loaded."""
    import threading

    import numpy as np

    from custom_components.sarai.engine.errors import ContextOverflow, ModelCorrupt
    from custom_components.sarai.engine.llama_backend import LlamaBackend

    backend = LlamaBackend("text", gguf_path, 512, mmproj=mmproj_path)
    backend.load()
    try:
        stop = threading.Event()
        with pytest.raises(ContextOverflow):
            backend.media_chat([("audio", np.zeros(16000 * 29, np.float32))], "transcribe", 16, stop)
        stop.set()
        from PIL import Image

        image = Image.new("RGB", (56, 56), (10, 200, 10))
        assert backend.media_chat([("image", image)], "hi", 16, stop, system="Eres SARAi") == ""
    finally:
        backend.unload()
    plain = LlamaBackend("text", gguf_path, 512)
    plain.load()
    try:
        with pytest.raises(ModelCorrupt):
            plain.media_chat([("audio", np.zeros(1600, np.float32))], "hi", 4, threading.Event())
    finally:
        plain.unload()


async def test_omni_processor_missing_and_speech_failure(tmp_path: Path, omni_path: str) -> None:
    """A checkpoint without its processor files fails to load with ModelCorrupt; a failed talker run too."""
    import shutil
    import threading

    from custom_components.sarai.engine.errors import ModelCorrupt
    from custom_components.sarai.engine.omni_backend import OmniBackend

    broken = tmp_path / "omni"
    shutil.copytree(omni_path, broken)
    (broken / "preprocessor_config.json").unlink(missing_ok=True)
    (broken / "processor_config.json").unlink(missing_ok=True)
    backend = OmniBackend("omni", str(broken))
    with pytest.raises(ModelCorrupt):
        backend.load()
    good = OmniBackend("omni", omni_path)
    good.load()
    try:
        with pytest.raises(ModelCorrupt, match="speech generation failed"):
            good.speak("Hola.", "Chelsie", threading.Event(), max_codec_tokens=0)
    finally:
        good.unload()


def test_clip_with_silent_track_and_damaged_middle(tmp_path: Path, clip_path: Path) -> None:
    """An audio stream without packets degrades to video only; bytes damaged mid-file are survived or refused."""
    import av
    import numpy as np

    path = tmp_path / "empty-audio.mp4"
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=10)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        out.add_stream("aac", rate=16000, layout="mono")
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, np.uint8), format="rgb24")
            frame.pts = i
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
    clip = prepare_clip(str(path), duration_s=2, fps=2)
    assert clip.audio is None and clip.warnings  # no packets: the muxer drops the track; video only
    assert clip.duration_s == pytest.approx(1.0, abs=0.01)

    data = bytearray(clip_path.read_bytes())
    rng = np.random.default_rng(1)
    lo, hi = len(data) * 2 // 5, len(data) * 3 // 5
    data[lo:hi] = rng.integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    try:
        clip = prepare_clip(str(damaged), duration_s=5, fps=2)
    except InvalidInput:
        return
    assert clip.frame_times


async def test_live_stream_that_stalls_mid_clip(socket_enabled, tmp_path: Path) -> None:
    """A live MPEG-TS stream that delivers its start and then stalls: MediaUnavailable after the timeout."""
    from aiohttp import web

    from devtools.media import make_clip
    from tests.common import local_server

    data = make_clip(tmp_path / "live.ts", seconds=4).read_bytes()
    release = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "video/mp2t"})
        await resp.prepare(request)
        await resp.write(data[: len(data) * 3 // 4])
        await release.wait()
        return resp

    app = web.Application()
    app.router.add_get("/live.ts", stream)
    async with local_server(app, release=release) as url:
        with pytest.raises(MediaUnavailable):
            await asyncio.to_thread(prepare_clip, f"{url}/live.ts", 10.0, 2.0, True, 448 * 448, 1.0)


def test_mmproj_libmtmd_refuses(tmp_path: Path, gguf_path: str, omni_path: str) -> None:
    """An mmproj whose projector libmtmd does not know: ModelCorrupt at load, and the text model is released."""
    from custom_components.sarai.engine.errors import ModelCorrupt
    from custom_components.sarai.engine.llama_backend import LlamaBackend
    from devtools.tiny_mmproj import write_tiny_mmproj

    bad = write_tiny_mmproj(Path(omni_path), tmp_path / "bad.gguf", projector="nonsense")
    backend = LlamaBackend("text", gguf_path, 512, mmproj=str(bad))
    with pytest.raises(ModelCorrupt, match="libmtmd"):
        backend.load()
    assert not backend.loaded
