"""SARAi benchmarks: ratios measured in one run (run by scripts/bench, never by scripts/test).

Each test appends rows to RESULTS; the session fixture prints the Markdown table and writes
bench/results/<date>.json. Rows: what, SARAi figure, reference figure, ratio, goal, pass/fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
import datetime as dt
import json
import os
from pathlib import Path
import platform
import resource
import shutil
import statistics
import subprocess
import time
from typing import Any

from homeassistant.components import conversation, stt, tts
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.setup import async_setup_component
import numpy as np
import pytest

from custom_components.sarai.engine.audio import decode_wav
from custom_components.sarai.engine.manager import process_rss_bytes
from custom_components.sarai.engine.media import prepare_clip
from devtools.media import make_clip, make_speech_wav, naive_prepare
from devtools.tiny_gguf import write_tiny_gguf

QUICK = os.environ.get("SARAI_BENCH_QUICK") == "1"
REPEATS = 3 if QUICK else 7
RESULTS: list[dict[str, Any]] = []
MB = 1024 * 1024


def row(
    what: str, sarai: float, reference: float | None, unit: str, goal: str, ok: bool | None, note: str = ""
) -> None:
    """Record one table row (ratio = SARAi / reference)."""
    ratio = None if not reference else sarai / reference
    RESULTS.append(
        {
            "what": what,
            "sarai": round(sarai, 4),
            "reference": None if reference is None else round(reference, 4),
            "unit": unit,
            "ratio": None if ratio is None else round(ratio, 3),
            "goal": goal,
            "pass": ok,
            "note": note,
        }
    )


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM: printed with every table."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")
        )
    except OSError, StopIteration:  # pragma: no cover
        mem_kb = 0
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
    }


@pytest.fixture(scope="session", autouse=True)
def report() -> Iterator[None]:
    """Print the table and write the JSON after all benchmarks."""
    yield
    info = machine()
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    payload = {"machine": info, "quick": QUICK, "date": stamp, "rows": RESULTS}
    (out_dir / f"{stamp}.json").write_text(json.dumps(payload, indent=2))
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, Python {info['python']}"
        + (" (quick run)" if QUICK else ""),
        "",
        "| what | SARAi | reference | ratio | goal | pass |",
        "|---|---|---|---|---|---|",
    ]
    for r in RESULTS:
        ref = "" if r["reference"] is None else f"{r['reference']} {r['unit']}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']}x"
        verdict = {True: "pass", False: "MISS", None: "info"}[r["pass"]]
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {r['what']}{note} | {r['sarai']} {r['unit']} | {ref} | {ratio} | {r['goal']} | {verdict} |")
    text = "\n".join(lines)
    print("\n\n" + text + "\n")
    (out_dir / f"{stamp}.md").write_text(text + "\n")


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="session")
def big_gguf(bench_dir: Path) -> Path:
    """A random GGUF large enough that compute dominates (f16)."""
    n_embd, n_layer, n_ff = (512, 6, 1536) if QUICK else (1024, 12, 3072)
    return write_tiny_gguf(
        bench_dir / "big.gguf", n_embd=n_embd, n_layer=n_layer, n_head=8, n_head_kv=2, n_ff=n_ff, dtype=np.float16
    )


@pytest.fixture(scope="session")
def omni_dir(bench_dir: Path) -> Path:
    from devtools.tiny_omni import write_tiny_omni

    return write_tiny_omni(bench_dir / "omni")


@pytest.fixture
async def ha(hass: HomeAssistant) -> HomeAssistant:
    assert await async_setup_component(hass, "homeassistant", {})
    return hass


async def _entry(hass: HomeAssistant, data: dict[str, Any], options: dict[str, Any]) -> Any:
    from pytest_homeassistant_custom_component.common import MockConfigEntry

    entry = MockConfigEntry(
        domain="sarai",
        title="SARAi",
        unique_id="sarai",
        data={"memory_budget_mb": 12000, **data},
        options={"context_size": 4096, "temperature": 0.0, "llm_hass_api": [], **options},
    )
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    return entry


async def _turn(hass: HomeAssistant, text: str = "Hola, ¿qué tiempo hace?") -> float:
    start = time.perf_counter()
    await conversation.async_converse(hass, text, None, Context(), agent_id="conversation.sarai")
    return time.perf_counter() - start


def _raw_call(llm: Any, tokens: list[int], n: int) -> float:
    start = time.perf_counter()
    produced = 0
    for _token in llm.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05):
        llm.detokenize([_token], special=True)
        produced += 1
        if produced >= n:
            break
    return time.perf_counter() - start


async def test_conversation_overhead_and_cold_start(ha: HomeAssistant, big_gguf: Path) -> None:
    """Rows 1 and 3: one Assist turn through HA vs the same tokens straight through llama-cpp-python."""
    import llama_cpp

    n_tokens = 32 if QUICK else 64
    t0 = time.perf_counter()
    entry = await _entry(ha, {"gguf_model": str(big_gguf)}, {"max_tokens": n_tokens})
    cold_first = await _turn(ha) + 0  # includes the model load
    cold_total = time.perf_counter() - t0
    backend = entry.runtime_data.engine.text
    prompt, generated = list(backend.last_prompt_tokens), backend.last_generated
    gguf_mb = backend.info.size_bytes // MB
    sarai, prompts = [], []
    for _ in range(REPEATS):
        sarai.append(await _turn(ha))
        prompts.append(list(backend.last_prompt_tokens))  # HA's prompt carries the time: it changes a little
    await ha.config_entries.async_remove(entry.entry_id)

    t_load = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(big_gguf), n_ctx=4096, verbose=False)
    raw_load = time.perf_counter() - t_load
    raw_first = await asyncio.to_thread(_raw_call, llm, prompt, generated)  # loaded, prompt not cached yet
    # The same prompts in the same order, so llama-cpp-python's prefix cache helps both sides equally.
    raw = [await asyncio.to_thread(_raw_call, llm, p, generated) for p in prompts]
    llm.close()
    s, r = statistics.median(sarai), statistics.median(raw)
    row(
        "1. conversation turn (HA entity+ChatLog+engine) vs raw llama-cpp-python",
        s,
        r,
        "s",
        "<= 1.03x",
        s / r <= 1.03,
        f"{len(prompt)} prompt + {generated} generated tokens, {gguf_mb} MB GGUF",
    )
    row(
        "3a. cold start: setup -> first answer, no warm-up",
        cold_total,
        raw_load + r,
        "s",
        "info",
        None,
        f"reference = raw load {raw_load:.2f} s + warm raw call",
    )
    del cold_first

    # 3b: with warm-up, the first turn after the background load.
    entry = await _entry(ha, {"gguf_model": str(big_gguf)}, {"max_tokens": n_tokens, "warmup": True})
    engine = entry.runtime_data.engine
    for _ in range(600):
        if engine.text.loaded:
            break
        await asyncio.sleep(0.01)
    first = await _turn(ha)
    row(
        "3b. first turn after warm-up vs the first raw call on a loaded model",
        first,
        raw_first,
        "s",
        "<= 1.1x",
        first / raw_first <= 1.1,
        "both evaluate the whole prompt once",
    )
    await ha.config_entries.async_remove(entry.entry_id)


async def test_concurrency(ha: HomeAssistant, big_gguf: Path) -> None:
    """Row 2: 20 simultaneous turns: all answered, FIFO, queue wait and total time percentiles."""
    entry = await _entry(ha, {"gguf_model": str(big_gguf)}, {"max_tokens": 8})
    engine = entry.runtime_data.engine
    await _turn(ha)
    engine.manager.queue_waits.clear()
    started = time.perf_counter()

    async def one(i: int) -> float:
        result = await conversation.async_converse(ha, f"pregunta {i}", None, Context(), agent_id="conversation.sarai")
        assert result.response.speech["plain"]["speech"]
        return time.perf_counter() - started

    totals = await asyncio.gather(*(one(i) for i in range(20)))
    waits = sorted(engine.manager.queue_waits)
    p = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    row("2. 20 concurrent turns answered", len(totals), 20, "turns", "all answered", len(totals) == 20)
    row("2. queue wait P50 / P99", p(waits, 0.5), p(waits, 0.99), "s", "info", None, "reference column = P99")
    row(
        "2. total time P50 / P99",
        p(sorted(totals), 0.5),
        p(sorted(totals), 0.99),
        "s",
        "info",
        None,
        "reference column = P99",
    )
    await ha.config_entries.async_remove(entry.entry_id)


async def test_memory(ha: HomeAssistant, big_gguf: Path, omni_dir: Path) -> None:
    """Row 4: RSS growth per file byte (mmap), peak RSS under a tight budget, eviction cost."""
    import gc

    gc.collect()
    entry = await _entry(ha, {"gguf_model": str(big_gguf)}, {"max_tokens": 4})
    engine = entry.runtime_data.engine
    before = process_rss_bytes()
    await _turn(ha)
    grown = process_rss_bytes() - before
    size = engine.text.info.size_bytes
    kv = engine.text.info.kv_cache_bytes(4096)
    row(
        "4a. RSS growth after loading the GGUF / (file + KV cache)",
        grown / MB,
        (size + kv) / MB,
        "MB",
        "<= 1.05x",
        grown <= 1.05 * (size + kv),
    )
    await ha.config_entries.async_remove(entry.entry_id)

    # A budget that holds the text model or the Omni model, not both: every switch evicts.
    from custom_components.sarai.engine import EngineConfig, SaraiEngine

    probe = SaraiEngine(EngineConfig(gguf_model=str(big_gguf), omni_model=str(omni_dir), n_ctx=4096))
    text_mb = probe.text.estimate_bytes() // MB
    omni_mb = probe.manager.backend("omni").estimate_bytes() // MB
    budget = max(text_mb, omni_mb) + min(text_mb, omni_mb) // 2
    entry = await _entry(
        ha, {"gguf_model": str(big_gguf), "omni_model": str(omni_dir), "memory_budget_mb": budget}, {"max_tokens": 4}
    )
    engine = entry.runtime_data.engine
    baseline = process_rss_bytes()
    peak_engine = 0
    switches = []
    for _ in range(REPEATS):
        await _turn(ha)
        peak_engine = max(peak_engine, engine.manager.used_bytes())
        start = time.perf_counter()
        await engine.speak("Hola.", "Chelsie")
        switches.append(time.perf_counter() - start)
        peak_engine = max(peak_engine, engine.manager.used_bytes())
    reloads = [b.loads for b in (engine.text, engine.manager.backend("omni"))]
    row(
        "4b. peak estimated resident models vs a tight budget",
        peak_engine / MB,
        budget,
        "MB",
        "<= budget",
        peak_engine / MB <= budget,
        f"text {text_mb} MB, omni {omni_mb} MB, loads {reloads}",
    )
    row(
        "4c. process RSS growth over the eviction run",
        (process_rss_bytes() - baseline) / MB,
        budget,
        "MB",
        "<= budget",
        (process_rss_bytes() - baseline) / MB <= budget,
        f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB incl. HA/torch",
    )
    row("4d. eviction cost: unload text + load Omni + speak", statistics.median(switches), None, "s", "info", None)
    await ha.config_entries.async_remove(entry.entry_id)


async def test_stt_tts_overhead(ha: HomeAssistant, big_gguf: Path, omni_dir: Path) -> None:
    """Row 5: entity path vs direct backend call; TTS time to first audio, streaming vs whole text."""
    entry = await _entry(ha, {"gguf_model": str(big_gguf), "omni_model": str(omni_dir)}, {"max_tokens": 4})
    engine = entry.runtime_data.engine
    wav = make_speech_wav()
    samples, rate = decode_wav(wav)
    entity = stt.async_get_speech_to_text_entity(ha, "stt.sarai_speech_to_text")
    meta = stt.SpeechMetadata(
        "es",
        stt.AudioFormats.WAV,
        stt.AudioCodecs.PCM,
        stt.AudioBitRates.BITRATE_16,
        stt.AudioSampleRates.SAMPLERATE_16000,
        stt.AudioChannels.CHANNEL_MONO,
    )

    async def chunks() -> Any:
        for i in range(0, len(wav), 3200):
            yield wav[i : i + 3200]

    await engine.transcribe(samples, rate, "es")
    via_entity, direct = [], []
    for _ in range(REPEATS):
        t = time.perf_counter()
        await entity.async_process_audio_stream(meta, chunks())
        via_entity.append(time.perf_counter() - t)
        omni = engine.manager.backend("omni")
        t = time.perf_counter()
        await asyncio.to_thread(omni.transcribe, samples, "es", __import__("threading").Event())
        direct.append(time.perf_counter() - t)
    s, r = statistics.median(via_entity), statistics.median(direct)
    row("5a. STT entity vs direct Omni call (same audio)", s, r, "s", "<= 1.05x", s / r <= 1.05)

    tts_entity = ha.data[tts.DATA_COMPONENT].get_entity("tts.sarai_text_to_speech")
    text = "Hola. Soy SARAi. Hoy hace sol en casa. Las luces de la cocina están encendidas."
    whole, first = [], []
    for _ in range(REPEATS):
        t = time.perf_counter()
        await tts_entity.async_get_tts_audio(text, "es", {"voice": "Chelsie"})
        whole.append(time.perf_counter() - t)

        async def gen() -> Any:
            for piece in text.split(" "):
                yield piece + " "

        t = time.perf_counter()
        response = await tts_entity.async_stream_tts_audio(tts.TTSAudioRequest("es", {}, gen()))
        got_audio = None
        async for chunk in response.data_gen:
            if got_audio is None and len(chunk) > 44:
                got_audio = time.perf_counter() - t
        first.append(got_audio or 0.0)
    s, r = statistics.median(first), statistics.median(whole)
    row(
        "5b. TTS time to first audio: streaming vs whole-text synthesis",
        s,
        r,
        "s",
        "< 1x",
        s < r,
        "the random talker runs to its codec cap for any text, so one sentence costs as much as the whole",
    )
    await ha.config_entries.async_remove(entry.entry_id)


def _ffmpeg_prepare(path: Path) -> None:
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-threads",
            "0",
            "-i",
            str(path),
            "-vf",
            "fps=2,scale=448:-2",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-",
            "-ac",
            "1",
            "-ar",
            "16000",
            "-f",
            "f32le",
            "-",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def test_clip_preparation(bench_dir: Path) -> None:
    """Row 6: 10 s of 720p H.264 + AAC -> 2 fps frames + 16 kHz audio."""
    clip = make_clip(bench_dir / "720p.mp4", seconds=10, size=(1280, 720), fps=30)
    ours = []
    naive = []
    cli = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        prepared = prepare_clip(str(clip), duration_s=10, fps=2)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        naive_prepare(str(clip), fps=2)
        naive.append(time.perf_counter() - t)
        if shutil.which("ffmpeg"):
            t = time.perf_counter()
            _ffmpeg_prepare(clip)
            cli.append(time.perf_counter() - t)
    assert len(prepared.frame_times) == 20
    s = statistics.median(ours)
    n = statistics.median(naive)
    row("6a. clip prep vs naive full decode (PyAV, every frame to RGB)", s, n, "s", "<= 0.2x", s / n <= 0.2)
    if cli:
        c = statistics.median(cli)
        row("6b. clip prep vs `ffmpeg -vf fps=2` CLI", s, c, "s", "<= 1.2x", s / c <= 1.2)
    try:
        import qwen_omni_utils  # noqa: F401
    except ImportError:
        row(
            "6c. clip prep vs qwen-omni-utils",
            s,
            None,
            "s",
            "<= 0.2x",
            None,
            "skipped: qwen-omni-utils needs librosa/audioread and torchvision's removed video reader",
        )


@pytest.mark.skipif(not os.environ.get("SARAI_BENCH_GGUF"), reason="no --gguf given")
def test_real_weights() -> None:
    """Row 7: prompt and decode tokens/s on the user's real GGUF, against the memory-bandwidth bound."""
    import llama_cpp

    path = os.environ["SARAI_BENCH_GGUF"]
    size = Path(path).stat().st_size
    buf = np.ones(512 * MB // 8)
    t = time.perf_counter()
    for _ in range(5):
        buf.copy()
    bandwidth = 2 * 5 * buf.nbytes / (time.perf_counter() - t)  # read + write
    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, verbose=False)
    prompt = llm.tokenize(("Explica por qué el cielo es azul. " * 20).encode(), add_bos=False)
    t = time.perf_counter()
    llm.eval(prompt)
    pp = len(prompt) / (time.perf_counter() - t)
    t = time.perf_counter()
    n = 0
    for _tok in llm.generate(prompt, temp=0.0):
        n += 1
        if n >= 64:
            break
    tg = n / (time.perf_counter() - t)
    bound = bandwidth / size
    row("7a. prompt processing", pp, None, "tok/s", "info", None, Path(path).name)
    row(
        "7b. decode vs memory-bandwidth bound",
        tg,
        bound,
        "tok/s",
        "info",
        None,
        f"bandwidth {bandwidth / 1e9:.1f} GB/s, {size // MB} MB read per token",
    )
    llm.close()
