"""Speed at Qwen2.5-Omni-7B's real size: ``scripts/bench --shape 7b`` (opt-in, never part of ``scripts/test``).

Speed does not depend on the weights' values: ``devtools.shape7b`` builds (once, cached outside the checkout)
a Q4_K_M GGUF with exactly the 7B thinker's text shapes and random weights. On that file, with
``os.cpu_count()`` threads on both sides:

* prompt tokens/s: ``llama-bench -p 512 -n 0`` vs SARAi evaluating a 512-token chat prompt through
  ``LlamaBackend.chat`` (cache off: ``cache_bytes=0`` and an empty KV cache before each run, so all 512 tokens
  are evaluated; counted: the wall time of ``_evaluate``, i.e. the common-prefix check, the KV truncation and
  llama.cpp's evaluation of the 512 tokens in one batch);
* decode tokens/s: ``llama-bench -n 64 -p 0 -d D`` (D: the depth of SARAi's short prompt) vs SARAi generating
  65 tokens greedily (the file never ends a turn, see ``devtools.shape7b``): counted from the end of the prompt's
  evaluation to the 65th token, which is 64 one-token evaluations plus 65 samplings and detokenizations;
* llama-bench and SARAi's llama-cpp-python run with the same batch (512), micro-batch (512), threads, f16 KV
  cache, mmap, and the flash-attention setting SARAi's context got (read from llama.cpp's log at load:
  llama-cpp-python's ``Llama`` turns it off; a default context leaves it to llama.cpp, "auto").
  They are different builds of llama.cpp (Debian's libllama, which picks a CPU variant at run time, vs the
  llama-cpp-python wheel built here with ``GGML_NATIVE=OFF``): llama.cpp's own counters inside SARAi
  (``llama_perf_context``) split the ratio into the library's share and SARAi's code;
* A/B runs interleaved (AB, BA, BA), medians of ROUNDS;
* the share of the memory-bandwidth bound: file bytes x decode tokens/s / the bandwidth of every core copying
  large arrays (numpy, read + write counted: ``bench.test_bench.memory_bandwidth``);
* time to first token of a voice turn with Home Assistant's real Assist prompt for a home of 50 exposed
  entities (built by SARAi's conversation agent as in ``bench/test_prompt_cache.py``), through ``SaraiEngine``:
  cold (a fresh engine, nothing cached; one run: it takes minutes), then a fresh engine's warm-up prefill of
  the static prefix (timed), then new conversations' turns on it (median of ROUNDS). The engine runs with a
  request timeout of COLD_TIMEOUT_S; the cold turn's total is compared with SARAi's default (120 s), beyond
  which a real turn fails.

Prints a Markdown table (the machine, the file, the load average before and after) and writes
bench/results/shape7b-<date>.json.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import fields
import datetime as dt
import json
import os
from pathlib import Path
import re
import shutil
import statistics
import subprocess
import threading
import time
from typing import Any

from homeassistant.components import conversation
from homeassistant.core import HomeAssistant
from homeassistant.setup import async_setup_component
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from bench.test_bench import interleaved_sync, machine, memory_bandwidth
from bench.test_prompt_cache import QUESTIONS, _system_prompt, _ttft, _turn
from custom_components.sarai.const import DOMAIN
from custom_components.sarai.engine import ChatMessage, ChatRequest, EngineConfig, SaraiEngine
from custom_components.sarai.engine.llama_backend import LlamaBackend
from custom_components.sarai.engine.models import read_gguf
from tests.conftest import agent_subentries

pytestmark = pytest.mark.skipif(
    os.environ.get("SARAI_BENCH_SHAPE") != "7b", reason="opt-in: scripts/bench --shape 7b (SARAI_BENCH_SHAPE=7b)"
)

ROUNDS = 3
THREADS = os.cpu_count() or 1
PROMPT_TOKENS = 512
GEN_TOKENS = 64  # one-token evaluations timed on both sides
N_CTX_AB = 1024
N_CTX_ASSIST = 8192  # as bench/test_prompt_cache.py
RESULTS_DIR = Path(__file__).parent / "results"
GOAL = 0.97
COLD_TIMEOUT_S = 1800.0  # the engine's request timeout here (a cold 7B Assist turn on 2 cores takes minutes)
FLUSH_TOKEN = 152063  # the last padding token of devtools.shape7b's vocabulary
# one token each
WORDS = [" the", " kitchen", " light", " is", " on", " and", " the", " front", " door", " is", " open"]

ROWS: list[dict[str, Any]] = []
INFO: dict[str, Any] = {}


def _row(what: str, sarai: float | None, reference: float | None, unit: str, goal: str, ok: bool | None) -> None:
    ratio = sarai / reference if sarai is not None and reference else None
    ROWS.append(
        {
            "what": what,
            "sarai": None if sarai is None else round(sarai, 4),
            "reference": None if reference is None else round(reference, 4),
            "unit": unit,
            "ratio": None if ratio is None else round(ratio, 3),
            "goal": goal,
            "pass": ok,
        }
    )


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    return f"{value:.1f} %" if unit == "%" else f"{value:.3g} {unit}"


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    """Print the table and write the JSON after the module's tests (whatever rows they recorded)."""
    INFO["load_before"] = [round(x, 2) for x in os.getloadavg()]
    INFO["started"] = time.time()
    yield
    if not ROWS:
        return
    INFO["load_after"] = [round(x, 2) for x in os.getloadavg()]
    INFO["wall_s"] = round(time.time() - INFO.pop("started"), 1)
    info = machine()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"shape7b-{stamp}.json").write_text(
        json.dumps({"machine": info, "date": stamp, **INFO, "rows": ROWS}, indent=2, default=str)
    )
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), {info['ram_gb']} GB RAM, "
        f"Python {info['python']}; {THREADS} threads on both sides",
        f"Model: {INFO.get('model', '?')}",
        f"llama-bench: {INFO.get('llama_bench', '?')}; SARAi: llama-cpp-python {INFO.get('llama_cpp_python', '?')}",
        f"Memory bandwidth: {INFO.get('bandwidth_gbs', '?')} GB/s (numpy copies on {THREADS} threads, read + write)",
        f"Load average (1/5/15 min) before: {INFO['load_before']}, after: {INFO['load_after']}; "
        f"wall time {INFO['wall_s']:.0f} s",
        "",
        "| what | SARAi | llama-bench / reference | ratio | goal | pass |",
        "|---|---|---|---|---|---|",
    ]
    for r in ROWS:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}x"
        verdict = {True: "pass", False: "MISS", None: "info"}[r["pass"]]
        lines.append(
            f"| {r['what']} | {_fmt(r['sarai'], r['unit'])} | {_fmt(r['reference'], r['unit'])} | {ratio} "
            f"| {r['goal']} | {verdict} |"
        )
    print("\n\n" + "\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def shape_gguf() -> Path:
    """The cached 7B-shape file (built on first use, ~6 min on 2 cores); its build times go to the report."""
    from devtools.shape7b import build_info, shape7b_gguf, target_path

    built_now = not target_path().is_file()
    try:
        path = shape7b_gguf()
    except (FileNotFoundError, OSError) as err:
        pytest.fail(f"cannot build the 7B-shape GGUF: {err}")
    size = path.stat().st_size
    INFO["model"] = (
        f"`{path.name}` ({size / 1e9:.2f} GB, qwen2, Q4_K_M, Qwen2.5-Omni-7B text shapes, random weights)"
        f" in {path.parent}"
    )
    INFO["model_path"] = str(path)
    INFO["model_bytes"] = size
    INFO["build"] = {**(build_info(path) or {}), "built_in_this_run": built_now}
    return path


# -- llama-bench ---------------------------------------------------------------------------------


def _llama_bench(path: Path, flash_attn: str, *args: str) -> dict[str, Any]:
    exe = shutil.which("llama-bench")
    assert exe is not None
    cmd = [exe, "-m", str(path), "-t", str(THREADS), "-b", "512", "-ub", "512", "-fa", flash_attn, "-lm", "mmap"]
    cmd += ["-r", "1", "-o", "json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    results = json.loads(proc.stdout)
    assert len(results) == 1, results
    result = results[0]
    result["stderr_backend"] = next((ln for ln in proc.stderr.splitlines() if "load_backend" in ln), "")
    return result


def _llama_bench_version() -> str:
    exe = shutil.which("llama-bench")
    assert exe is not None
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False, timeout=60)
    text = proc.stdout + proc.stderr
    version = next((ln.strip() for ln in text.splitlines() if ln.startswith("version")), "?")
    variant = next((ln.rsplit("/", 1)[-1] for ln in text.splitlines() if "load_backend" in ln), "?")
    return f"{version}, CPU backend {variant}"


# -- SARAi through LlamaBackend ------------------------------------------------------------------


class _Probe:
    """Wraps a backend's ``_evaluate`` (instance attribute): how long the prompt's evaluation took, when it ended.

    Only ``_evaluate`` (its signature) and the llama_context of the loaded model (``_llm._ctx.ctx``, for
    llama.cpp's own counters) are used, so that the probe does not depend on how the backend keeps its KV cache.
    """

    def __init__(self, backend: LlamaBackend) -> None:
        self.backend = backend
        self.evaluate_s = 0.0
        self.evaluated_at = 0.0
        self.inner = inner = backend._evaluate

        def timed(*args: Any, **kwargs: Any) -> bool:
            started = time.perf_counter()
            done = inner(*args, **kwargs)
            self.evaluated_at = time.perf_counter()
            self.evaluate_s = self.evaluated_at - started
            return done

        backend._evaluate = timed  # type: ignore[method-assign]

    def perf(self) -> dict[str, float]:
        """llama.cpp's own counters for the context since the last reset (prompt and one-token evaluations)."""
        import llama_cpp

        data = llama_cpp.llama_perf_context(self.backend._llm._ctx.ctx)
        return {k: getattr(data, k) for k in ("t_p_eval_ms", "n_p_eval", "t_eval_ms", "n_eval")}

    def reset(self) -> None:
        """Nothing of the next chat's prompt in the live KV cache (it then holds one padding token, which no
        prompt starts with; no prompt is saved: ``cache_bytes=0``), and fresh counters."""
        import llama_cpp

        ctx = self.backend._llm._ctx.ctx
        self.inner([FLUSH_TOKEN], None, threading.Event(), 1, count=False)
        llama_cpp.llama_synchronize(ctx)  # llama.cpp counts a decode's time when it waits for it
        llama_cpp.llama_perf_context_reset(ctx)


def _load_logging(load: Callable[[], None]) -> list[str]:
    """Run ``load`` with llama.cpp's log captured (llama-cpp-python's own log callback is put back after)."""
    import ctypes

    import llama_cpp
    from llama_cpp._logger import llama_log_callback as default_callback

    lines: list[str] = []

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def capture(_level: int, text: bytes, _user_data: Any) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        load()
    finally:
        llama_cpp.llama_log_set(default_callback, ctypes.c_void_p(0))
    return lines


def _flash_attn(log: list[str]) -> str:
    """SARAi's flash-attention setting as llama.cpp resolved it at load ("on", "off"; "auto" when not logged)."""
    text = "".join(log)
    for pattern, value in (
        (r"Flash Attention was auto, set to enabled", "on"),
        (r"Flash Attention was auto, set to disabled", "off"),
        (r"flash_attn\s*=\s*(enabled|1|true)\b", "on"),
        (r"flash_attn\s*=\s*(disabled|0|false)\b", "off"),
    ):
        if re.search(pattern, text):
            return value
    return "auto"


def _request(backend: LlamaBackend, n_tokens: int | None, max_tokens: int) -> ChatRequest:
    """A one-message chat whose prompt is exactly ``n_tokens`` tokens (None: a short question)."""
    if n_tokens is None:
        return ChatRequest([ChatMessage("user", "Tell me a story.")], max_tokens=max_tokens, temperature=0.0)
    words: list[str] = []
    while True:
        request = ChatRequest([ChatMessage("user", "".join(words))], max_tokens=max_tokens, temperature=0.0)
        have = len(backend.prompt_tokens(request))
        if have == n_tokens:
            return request
        if have > n_tokens:
            raise AssertionError(f"cannot make a prompt of exactly {n_tokens} tokens ({have})")
        words += [WORDS[len(words) % len(WORDS)] for _ in range(max(1, (n_tokens - have) // 2))]


def test_throughput_vs_llama_bench(shape_gguf: Path) -> None:
    """Prompt and decode tokens/s, SARAi vs llama-bench on the same file and threads; the bandwidth share."""
    import llama_cpp

    if shutil.which("llama-bench") is None:
        pytest.fail("llama-bench is not on PATH (Debian: llama.cpp-tools; scripts/setup installs it in the root fs)")
    INFO["llama_bench"] = _llama_bench_version()
    INFO["llama_cpp_python"] = f"{llama_cpp.__version__} ({llama_cpp.llama_print_system_info().decode().strip()})"
    INFO["settings"] = {"threads": THREADS, "n_batch": 512, "n_ubatch": 512, "kv": "f16", "load": "mmap"}

    bandwidth = statistics.median(memory_bandwidth(2.0) for _ in range(3))
    INFO["bandwidth_gbs"] = round(bandwidth / 1e9, 1)

    backend = LlamaBackend("shape7b", str(shape_gguf), N_CTX_AB, n_threads=THREADS, cache_bytes=0)
    started = time.perf_counter()
    flash_attn = _flash_attn(_load_logging(backend.load))
    INFO["sarai_load_s"] = round(time.perf_counter() - started, 1)
    INFO["settings"]["flash_attn"] = flash_attn
    probe = _Probe(backend)
    stop = threading.Event()
    samples: dict[str, list[float]] = {
        k: [] for k in ("sarai_pp", "bench_pp", "sarai_tg", "bench_tg", "perf_pp", "perf_tg")
    }
    try:
        prompt = _request(backend, PROMPT_TOKENS, 1)
        story = _request(backend, None, GEN_TOKENS + 1)
        depth = len(backend.prompt_tokens(story))
        probe.reset()
        backend.chat(_request(backend, None, 4), lambda _t: None, stop)  # warm-up (llama-bench warms up too)

        def sarai_pp(_i: int) -> float:
            probe.reset()
            backend.chat(prompt, lambda _t: None, stop)
            assert (backend.last_reused_tokens, backend.last_evaluated_tokens) == (0, PROMPT_TOKENS)
            perf = probe.perf()
            samples["perf_pp"].append(perf["n_p_eval"] / perf["t_p_eval_ms"] * 1000)
            samples["sarai_pp"].append(PROMPT_TOKENS / probe.evaluate_s)
            return samples["sarai_pp"][-1]

        def bench_pp(_i: int) -> float:
            result = _llama_bench(shape_gguf, flash_attn, "-p", str(PROMPT_TOKENS), "-n", "0")
            samples["bench_pp"].append(float(result["samples_ts"][0]))
            INFO.setdefault("llama_bench_result", result)
            return samples["bench_pp"][-1]

        def sarai_tg(_i: int) -> float:
            probe.reset()
            backend.chat(story, lambda _t: None, stop)
            window = time.perf_counter() - probe.evaluated_at
            assert backend.last_generated == GEN_TOKENS + 1, backend.last_generated
            perf = probe.perf()
            assert perf["n_eval"] == GEN_TOKENS, perf
            samples["perf_tg"].append(perf["n_eval"] / perf["t_eval_ms"] * 1000)
            samples["sarai_tg"].append(GEN_TOKENS / window)
            return samples["sarai_tg"][-1]

        def bench_tg(_i: int) -> float:
            result = _llama_bench(shape_gguf, flash_attn, "-p", "0", "-n", str(GEN_TOKENS), "-d", str(depth))
            samples["bench_tg"].append(float(result["samples_ts"][0]))
            return samples["bench_tg"][-1]

        interleaved_sync(sarai_pp, bench_pp, ROUNDS)
        interleaved_sync(sarai_tg, bench_tg, ROUNDS)
    finally:
        backend.unload()
    INFO["samples_tok_s"] = {k: [round(x, 3) for x in v] for k, v in samples.items()}
    INFO["decode_depth"] = depth
    med = {k: statistics.median(v) for k, v in samples.items()}
    pp_ratio, tg_ratio = med["sarai_pp"] / med["bench_pp"], med["sarai_tg"] / med["bench_tg"]
    _row(
        f"prompt tok/s, {PROMPT_TOKENS}-token prompt, cold (median of {ROUNDS}, ABBA)",
        med["sarai_pp"],
        med["bench_pp"],
        "tok/s",
        f">= {GOAL}x",
        pp_ratio >= GOAL,
    )
    _row(
        f"decode tok/s, {GEN_TOKENS} tokens after {depth} (median of {ROUNDS}, ABBA)",
        med["sarai_tg"],
        med["bench_tg"],
        "tok/s",
        f">= {GOAL}x",
        tg_ratio >= GOAL,
    )
    _row(
        "prompt tok/s inside SARAi, llama.cpp's own counter (llama-cpp-python's build)",
        med["perf_pp"],
        med["bench_pp"],
        "tok/s",
        "info",
        None,
    )
    _row(
        "decode tok/s inside SARAi, llama.cpp's own counter (llama-cpp-python's build)",
        med["perf_tg"],
        med["bench_tg"],
        "tok/s",
        "info",
        None,
    )
    size = shape_gguf.stat().st_size
    weights = sum(t.n_bytes for t in read_gguf(shape_gguf).tensors if t.name != "token_embd.weight")
    INFO["bytes_per_token"] = {"file": size, "weights_read_without_token_embd": weights}
    _row(
        f"decode share of the memory-bandwidth bound ({size / 1e9:.2f} GB per token x tok/s"
        f" / {bandwidth / 1e9:.1f} GB/s)",
        100 * size * med["sarai_tg"] / bandwidth,
        100 * size * med["bench_tg"] / bandwidth,
        "%",
        "report",
        None,
    )


async def _assist_request(hass: HomeAssistant, tiny: Path) -> ChatRequest:
    """The Assist request (system prompt + tools) of SARAi's agent in a home of 50 exposed entities; the home as
    in bench/test_prompt_cache.py. The entry runs on the tiny GGUF: the prompt does not depend on the model,
    and setting it up would otherwise warm the 7B file up."""
    from homeassistant.components.homeassistant.exposed_entities import async_expose_entity

    assert await async_setup_component(hass, "homeassistant", {})
    booleans = {f"device_{i}": {"name": f"Device {i} in room {i % 7}"} for i in range(50)}
    assert await async_setup_component(hass, "input_boolean", {"input_boolean": booleans})
    for name in booleans:
        async_expose_entity(hass, conversation.DOMAIN, f"input_boolean.{name}", True)
    entry = MockConfigEntry(
        domain=DOMAIN,
        unique_id=DOMAIN,
        version=2,
        data={"gguf_model": str(tiny), "memory_budget_mb": 12000},
        options={"context_size": N_CTX_ASSIST},
        subentries_data=agent_subentries({"llm_hass_api": ["assist"], "max_tokens": 8, "temperature": 0.0}),  # type: ignore[arg-type]
    )
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    request = await _system_prompt(hass, "conversation.sarai")
    assert await hass.config_entries.async_unload(entry.entry_id)
    return request


async def test_assist_ttft_cold_vs_cached(hass: HomeAssistant, shape_gguf: Path, tmp_path: Path) -> None:
    """TTFT of a 50-entity Assist voice turn: cold (nothing cached) vs after the warm-up prefill."""
    from devtools.tiny_gguf import write_tiny_gguf

    assist = await _assist_request(hass, write_tiny_gguf(tmp_path / "tiny.gguf"))
    # SARAi's default request timeout (120 s) cuts a cold turn of this size off on a small machine: measured
    # without it, and the cold turn's total compared with it below.
    default_timeout = next(f.default for f in fields(EngineConfig) if f.name == "request_timeout_s")
    assert isinstance(default_timeout, float)
    config = EngineConfig(
        gguf_model=str(shape_gguf), n_ctx=N_CTX_ASSIST, n_threads=THREADS, request_timeout_s=COLD_TIMEOUT_S
    )
    tokens: dict[str, int] = {}

    cold = SaraiEngine(config)
    try:
        await cold.warmup()  # loads the model, evaluates nothing
        started = time.perf_counter()
        cold_ttft, _ = await _ttft(cold, _turn(assist, [], QUESTIONS[0], "shape7b-cold"))
        cold_total = time.perf_counter() - started
        tokens["cold_prompt"] = len(cold.text.last_prompt_tokens)
        tokens["cold_evaluated"] = cold.text.last_evaluated_tokens
        tokens["cold_generated"] = cold.text.last_generated
    finally:
        await cold.close()

    warm = SaraiEngine(config)
    cached: list[float] = []
    totals: list[float] = []
    evaluated: list[int] = []
    try:
        await warm.warmup()
        started = time.perf_counter()
        tokens["prefix"] = await warm.prefill(assist)
        prefill_s = time.perf_counter() - started
        for i, question in enumerate((QUESTIONS * ROUNDS)[:ROUNDS]):  # each a new conversation
            started = time.perf_counter()
            t, _ = await _ttft(warm, _turn(assist, [], question, f"shape7b-cached-{i}"))
            totals.append(time.perf_counter() - started)
            cached.append(t)
            evaluated.append(warm.text.last_evaluated_tokens)
        generated = warm.text.last_generated
    finally:
        await warm.close()
    INFO["assist_tokens"] = {**tokens, "cached_evaluated": evaluated, "generated_per_turn": generated}
    INFO["ttft_samples_s"] = {"cold": [round(cold_ttft, 3)], "cached": [round(x, 3) for x in cached]}
    INFO["cold_turn_total_s"] = round(cold_total, 3)
    INFO["request_timeout_s"] = {"default": default_timeout, "this_run": COLD_TIMEOUT_S}
    cached_ttft = statistics.median(cached)
    _row(
        f"TTFT cold, 50-entity Assist voice turn ({tokens['cold_evaluated']} of {tokens['cold_prompt']}"
        " tokens evaluated; 1 run)",
        cold_ttft,
        None,
        "s",
        "info",
        None,
    )
    _row(
        f"cold turn, total ({tokens['cold_generated']} tokens out) vs SARAi's default request timeout"
        " (the turn fails beyond it)",
        cold_total,
        default_timeout,
        "s",
        "< 1x",
        cold_total < default_timeout,
    )
    _row(
        f"warm-up prefill of the static prefix ({tokens['prefix']} tokens, chunks of 32; 1 run)",
        prefill_s,
        None,
        "s",
        "info",
        None,
    )
    _row(
        f"TTFT cached: prefix prefilled, new conversation ({statistics.median(evaluated):.0f} tokens evaluated;"
        f" median of {ROUNDS}) vs cold",
        cached_ttft,
        cold_ttft,
        "s",
        "report",
        None,
    )
    _row(
        f"whole cached turn, {generated} tokens out (median of {ROUNDS})",
        statistics.median(totals),
        None,
        "s",
        "info",
        None,
    )
