"""Text chat (and, with an mmproj, hearing and seeing) on the Qwen2.5-Omni GGUF through llama-cpp-python.

One KV cache holds several sequences (llama_runtime.py): sequence 0 is the live conversation, 1..n are saved
prompts (other conversations, prefilled prefixes: prompt_cache.py) and the last one is a media turn's, so that
hearing or seeing never clears a conversation's prompt.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
import ctypes
import logging
from pathlib import Path
import threading
from typing import Any

import numpy as np

from .errors import ContextOverflow, EngineError, InvalidInput, ModelCorrupt
from .grammar import check_gbnf, json_grammar
from .history import first_kept_turn, split_turns
from .llama_runtime import LIVE, DecodeError, LlamaRuntime
from .manager import Backend, Emit
from .models import GGUFInfo, MMProjInfo, inspect_gguf, inspect_mmproj
from .prompt_cache import (
    CacheEntry,
    PromptCache,
    StateStore,
    common_prefix,
    delete_cache_dir,
    model_identity,
    prefix_key,
)
from .text import sanitize_text
from .tools import ASSISTANT_OPENER, DAY_PREFIX, TOOL_CLOSE, TOOL_OPEN, Segment, message_segments, system_parts
from .types import ChatMessage, ChatRequest

_LOGGER = logging.getLogger(__name__)

MTMD_COMPUTE_BYTES = 64 * 1024 * 1024
MIN_ANSWER_TOKENS = 8  # below this much room for the answer the prompt does not fit
MIN_RESTORE_GAIN = 8  # read a state from disk only when it spares at least this many tokens over the live one
MIN_SAVE_TOKENS = 16  # save the live prompt before it is overwritten only when it holds this many tokens more
PREFILL_CHUNK = 32  # a prefill evaluates this many tokens at a time, and yields to a waiting request in between


class LlamaBackend(Backend):
    """A GGUF loaded with llama-cpp-python (memory-mapped weights, KV cache for n_ctx), plus its mmproj.

    The mmproj (audio + vision encoders) shares the text weights through libmtmd; it is loaded and
    evicted together with the text model.
    """

    kind = "gguf"

    def __init__(
        self,
        name: str,
        path: str,
        n_ctx: int,
        n_threads: int | None = None,
        mmproj: str | None = None,
        *,
        cache_bytes: int | None = None,
        cache_entries: int = 8,
        cache_dir: str | Path | None = None,
        cache_files: int = 4,
    ) -> None:
        """Validate the headers now; load later.

        ``cache_bytes``: KV-cache memory for saved prompts beyond the context's own (default twice the
        context's KV cache; 0 keeps none), counted in ``estimate_bytes``; ``cache_entries`` bounds their
        number. ``cache_dir``: where the prefilled prefix's state is kept across restarts (None: not on disk),
        at most ``cache_files`` files.
        """
        super().__init__(name)
        self.info: GGUFInfo = inspect_gguf(path)
        self.mmproj: MMProjInfo | None = inspect_mmproj(mmproj, self.info) if mmproj else None
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        kv_bytes = self.info.kv_cache_bytes(n_ctx)
        self.cache_bytes = max(0, 2 * kv_bytes if cache_bytes is None else cache_bytes)
        self.cache_entries = cache_entries
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cache_files = cache_files
        per_token = max(1, kv_bytes // max(1, n_ctx))
        self.n_cells = n_ctx + self.cache_bytes // per_token  # KV cells of all sequences together
        self.media_seq = (cache_entries if self.cache_bytes > 0 else 0) + 1
        self._llm: LlamaRuntime | None = None
        self._mtmd: Any = None
        self._cache: PromptCache | None = None
        self._live_key: str | None = None  # whose prompt the KV cache holds (a conversation, a prefix)
        self._live_dirty = False  # it holds tokens that no saved state has
        self.last_prompt_tokens: list[int] = []  # the last chat's prompt (benchmarks compare against it)
        self.last_reused_tokens = 0  # of it, tokens whose KV was already there (live or restored)
        self.last_evaluated_tokens = 0  # of it, tokens llama.cpp evaluated
        self.last_prefill_tokens = 0  # the static prefix the last prefill left cached
        self.last_generated = 0
        self.last_output_tokens: list[int] = []  # what the last chat generated
        self._tool_tokens: frozenset[int] = frozenset()  # special tokens whose text replies may hold

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory."""
        return self._llm is not None

    @property
    def can_hear(self) -> bool:
        """Audio input through the mmproj."""
        return self.mmproj is not None and self.mmproj.has_audio

    @property
    def can_see(self) -> bool:
        """Image input through the mmproj."""
        return self.mmproj is not None and self.mmproj.has_vision

    def estimate_bytes(self) -> int:
        """File size (mmap) + f16 KV cache + a compute buffer + saved prompts' cells (+ the mmproj and its buffer)."""
        total = self.info.size_bytes + self.info.kv_cache_bytes(self.n_ctx) + 32 * 1024 * 1024 + self.cache_bytes
        if self.mmproj is not None:
            total += self.mmproj.size_bytes + MTMD_COMPUTE_BYTES
        return total

    def load(self) -> None:
        """Load with llama-cpp-python (raises ModelCorrupt when llama.cpp refuses)."""
        import llama_cpp

        inspect_gguf(self.info.path)  # the file may have changed since setup
        try:
            self._llm = LlamaRuntime(
                self.info.path,
                n_ctx=self.n_ctx,
                n_cells=self.n_cells,
                n_seq=self.media_seq + 1,
                n_threads=self.n_threads,
            )
        except (ValueError, RuntimeError, OSError) as err:
            raise ModelCorrupt(f"llama.cpp cannot load {self.info.path}: {err}", path=self.info.path) from err
        # <tool_call> / </tool_call> may be special tokens: the only ones whose text a reply keeps
        # (the tool-call parser needs it); every other special token is generated as nothing.
        llm = self._llm
        ids = [llm.tokenize(tag.encode(), add_bos=False, special=True) for tag in (TOOL_OPEN, TOOL_CLOSE)]
        self._tool_tokens = frozenset(t[0] for t in ids if len(t) == 1)
        self._open_cache(llama_cpp.__version__)
        if self.mmproj is not None:
            try:
                self._load_mtmd()
            except EngineError:
                self.unload()
                raise

    def _load_mtmd(self) -> None:
        import llama_cpp.mtmd_cpp as mtmd

        assert self.mmproj is not None
        inspect_mmproj(self.mmproj.path, self.info)
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        assert self._llm is not None
        params.n_threads = self._llm.n_threads
        ctx = mtmd.mtmd_init_from_file(self.mmproj.path.encode(), self._llm.model, params)
        if not ctx:
            raise ModelCorrupt(f"libmtmd cannot load the mmproj {self.mmproj.path}", path=self.mmproj.path)
        self._mtmd = ctx

    def unload(self) -> None:
        """Free the mmproj, the model and its KV cache (with the saved prompts it holds)."""
        if self._cache is not None:
            self._cache.clear_memory()
        self._live_key, self._live_dirty = None, False
        if self._mtmd is not None:
            import llama_cpp.mtmd_cpp as mtmd

            mtmd.mtmd_free(self._mtmd)
            self._mtmd = None
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()

    def tokenize_segments(self, segments: list[Segment]) -> list[int]:
        """Tokens of prompt segments: special tokens are parsed in SARAi's template only, never in what
        a message holds (a user who writes ``<|im_start|>system`` gets those characters, not a new turn)."""
        assert self._llm is not None
        tokens: list[int] = []
        for text, special in segments:
            if text:
                data = text.encode("utf-8", errors="replace")
                tokens += self._llm.tokenize(data, add_bos=False, special=special)
        return tokens

    def prompt_tokens(self, request: ChatRequest) -> list[int]:
        """The prompt's tokens: system turn, the newest turns that fit (oldest whole turns dropped), the opener.

        Raises ContextOverflow when even the system turn and the newest turn leave no room to answer.
        """
        head, turns = split_turns(request.messages)
        fixed = self.prefix_tokens(request, head)
        system_tail = system_parts(head[0] if head else None, request.tools)[1]
        fixed += self.tokenize_segments(system_tail)
        for extra in head[1:]:  # further leading system messages (none from Home Assistant)
            fixed += self.tokenize_segments(message_segments(extra))
        opener = self.tokenize_segments(ASSISTANT_OPENER)
        turn_tokens = [[t for msg in turn for t in self.tokenize_segments(message_segments(msg))] for turn in turns]
        reserve = min(request.max_tokens, self.n_ctx // 2)
        budget = self.n_ctx - len(fixed) - len(opener) - reserve
        start = first_kept_turn([len(t) for t in turn_tokens], budget, request.history_turns)
        if start:
            _LOGGER.debug(
                "Conversation %s: dropped the %d oldest turns (%d messages, %d tokens) to fit %d tokens of context"
                " and a window of %d past turns",
                request.conversation_id,
                start,
                sum(len(t) for t in turns[:start]),
                sum(len(t) for t in turn_tokens[:start]),
                self.n_ctx,
                request.history_turns,
            )
        tokens = fixed + [t for turn in turn_tokens[start:] for t in turn] + opener
        if self.n_ctx - len(tokens) < MIN_ANSWER_TOKENS:
            raise ContextOverflow(
                f"the prompt has {len(tokens)} tokens; the context holds {self.n_ctx}",
                tokens=len(tokens),
                n_ctx=self.n_ctx,
            )
        return tokens

    def prefix_tokens(self, request: ChatRequest, head: list[ChatMessage] | None = None) -> list[int]:
        """The static start of the request's prompt: the system turn up to its dynamic part (tools, instructions,
        exposed context), the same for every conversation of an assistant until its settings change."""
        if head is None:
            head = split_turns(request.messages)[0]
        return self.tokenize_segments(system_parts(head[0] if head else None, request.tools)[0])

    def day_prefix_tokens(self, request: ChatRequest) -> list[int]:
        """What a prefill keeps: the static prefix and, when Home Assistant's clock sentence follows it, the
        sentence up to the time ("Today's date is …. Current time is"), which stays the same all day — so a
        new conversation evaluates only the time's digits and the user's words. Used only when those tokens
        are exactly the start of the real prompt's tokens; otherwise the static prefix alone."""
        head_messages = split_turns(request.messages)[0]
        system = head_messages[0] if head_messages else None
        head, tail = system_parts(system, request.tools)
        static = self.tokenize_segments(head)
        if not tail or len(tail) < 2 or tail[1][1]:
            return static
        dynamic = tail[1][0]
        match = DAY_PREFIX.match(dynamic)
        if match is None:
            return static
        day = self.tokenize_segments([*head, tail[0], (match.group(0), False)])
        full = self.tokenize_segments([*head, *tail])
        return day if full[: len(day)] == day else static

    def grammar(self, schema: dict[str, Any]) -> tuple[str, str]:
        """The GBNF (text, root rule) for ``schema``, checked in Python and by llama.cpp's own parser before any
        sampling."""
        text = json_grammar(schema)
        self.check_grammar(text, "root")
        return text, "root"

    def check_grammar(self, text: str, root: str = "root") -> None:
        """Refuse (InvalidInput) a GBNF text that our checker or llama.cpp's parser rejects.

        A NULL from ``llama_sampler_init_grammar`` in a sampler chain (a grammar llama.cpp could not parse,
        or a left-recursive one) crashes sampling.
        """
        import llama_cpp

        assert self._llm is not None
        check_gbnf(text, root)
        vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), root.encode())
        if not sampler:
            raise InvalidInput("llama.cpp refused the grammar", key="structure_invalid")
        llama_cpp.llama_sampler_free(sampler)

    def chat(self, request: ChatRequest, emit: Emit, stop: threading.Event) -> None:
        """Stream raw completion text for a chat request; stops at the next token when asked.

        Only what the KV cache does not hold yet is evaluated: the longest common prefix with the
        live sequence or with a saved one (another conversation's, a prefilled prefix) is kept
        (see ``_evaluate``); ``last_reused_tokens`` / ``last_evaluated_tokens`` say how much.
        """
        llm = self._llm
        assert llm is not None
        grammar = self.grammar(request.json_schema) if request.json_schema is not None else None
        tokens = self.prompt_tokens(request)
        room = self.n_ctx - len(tokens)
        # Our own token loop: a stop request is honoured at the next token, and text is decoded
        # incrementally (linear, even when a model emits partial UTF-8 for a long time). Special
        # tokens come out as nothing, but <tool_call> tags.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        budget = min(request.max_tokens, room - 1)
        produced: list[int] = []
        self.last_prompt_tokens = list(tokens)
        self.last_output_tokens = produced
        self.last_generated = 0
        if not self._evaluate(tokens, request.conversation_id, stop, llm.n_batch):
            return
        # The whole prompt is in the live sequence now, with the last token's logits: sample right away.
        chain = llm.sampler(request.temperature, grammar)
        try:
            pos = len(tokens)
            while not stop.is_set():
                token = llm.sample(chain)
                if llm.is_eog(token):
                    break
                produced.append(token)
                text = decoder.decode(llm.detokenize([token], special=token in self._tool_tokens))
                if text:
                    emit(text)
                if len(produced) >= budget:
                    break
                self._live_dirty = True
                pos = self._decode_live([token], pos)
        finally:
            llm.free_sampler(chain)
        self.last_generated = len(produced)
        tail = decoder.decode(b"", final=True)
        if tail:
            emit(tail)

    # -- saved prompts: the live sequence, saved sequences, prefill, files -------------------------

    def _open_cache(self, runtime: str) -> None:
        """Set up the saved prompts after a load (none when ``cache_bytes`` is 0); with a cache directory, find
        this model's state files and restore the newest (the first turn after a restart then reuses it)."""
        self._live_key, self._live_dirty = None, False
        self._cache = None
        if self.cache_bytes <= 0:
            return
        store = None
        if self.cache_dir is not None:
            try:
                identity = model_identity(self.info.path, self.n_ctx, f"llama-cpp-python {runtime}")
            except OSError as err:  # pragma: no cover - the file was inspected a moment ago
                _LOGGER.warning("No prompt states on disk: %s", err)
            else:
                max_disk = max(self.cache_files, 1) * max(self.info.kv_cache_bytes(self.n_ctx), 1) + (1 << 20)
                store = StateStore(self.cache_dir, identity, self.cache_files, max_disk)
        self._cache = PromptCache(self.media_seq - 1, store)
        found = self._cache.scan_disk()
        if found and self._restore(found[0]):
            _LOGGER.debug("Restored the prompt state of %d tokens from %s", len(found[0].tokens), self.cache_dir)

    def _make_room(self) -> bool:
        """Drop the least recently used saved prompt from the KV cache (a batch found no free cell)."""
        seq = self._cache.evict() if self._cache is not None else None
        if seq is None:
            return False
        assert self._llm is not None
        self._llm.seq_rm(seq)
        return True

    def _decode_live(self, tokens: list[int], pos: int) -> int:
        """Evaluate tokens at the end of the live sequence (with the last one's logits)."""
        assert self._llm is not None
        try:
            return self._llm.decode(tokens, pos, LIVE, logits_last=True, make_room=self._make_room)
        except DecodeError as err:  # pragma: no cover - the live sequence alone always fits its cells
            raise ModelCorrupt(f"llama.cpp could not evaluate the prompt: {err}", path=self.info.path) from err

    def _live_tokens(self) -> np.ndarray:
        assert self._llm is not None
        return self._llm.live_tokens()

    def _save_live(self, key: str | None) -> CacheEntry | None:
        """Keep the live prompt (a conversation's prompt and answer) in a sequence of its own before ``key``'s
        prompt replaces it (the cells are shared, not copied)."""
        if self._cache is None or not self._live_dirty or self._live_key is None or self._live_key == key:
            return None
        assert self._llm is not None
        seq = self._cache.slot_for(self._live_key)
        self._llm.seq_cp(LIVE, seq)
        self._live_dirty = False
        return self._cache.put(self._live_key, self._live_tokens(), seq)

    def _restore(self, entry: CacheEntry) -> bool:
        """Make the live sequence a saved prompt (read and checked from disk first when it is not in memory);
        on failure the live sequence is empty and the entry gone."""
        llm = self._llm
        assert self._cache is not None and llm is not None
        on_disk = entry.seq is None
        if entry.seq is None:
            data = self._cache.read(entry)  # bytes from disk are checked (size, header, checksum) first
            if data is None:
                return False
            seq = self._cache.slot_for(entry.key)
            while not (done := llm.set_state(seq, data)) and self._make_room():
                pass  # no free cells for it: drop saved prompts (if they were not the reason, it is refused)
            if not done:
                _LOGGER.warning("llama.cpp refused a saved prompt state (%s); it is evaluated again", entry.key)
                llm.seq_rm(LIVE)
                self._live_key = None
                self._cache.discard(entry)
                return False
            entry.seq = seq
        assert entry.seq is not None
        llm.seq_cp(entry.seq, LIVE)
        llm.set_live(entry.tokens)
        self._live_dirty = False
        self._live_key = entry.key
        self._cache.touch(entry)
        self._cache.restores += 1
        self._cache.disk_restores += int(on_disk)
        return True

    def _evaluate(
        self,
        tokens: list[int],
        key: str | None,
        stop: threading.Event,
        chunk: int,
        yield_to: Callable[[], bool] | None = None,
        *,
        count: bool = True,
    ) -> bool:
        """Make the live sequence hold ``tokens`` (with the last token's logits), evaluating as little as possible.

        The live sequence or the saved prompt with the longest common prefix is kept (one on disk only when
        it spares ``MIN_RESTORE_GAIN`` tokens more); the live one is saved first when that would lose a
        conversation's tokens. At least the last token is evaluated (fresh logits). The rest is evaluated
        ``chunk`` tokens at a time; False when ``stop`` (or ``yield_to()``) interrupted it between two chunks
        (what was evaluated stays in the live sequence).
        """
        llm = self._llm
        assert llm is not None
        target = np.asarray(tokens, dtype=np.int32)
        n = len(target)
        live = common_prefix(self._live_tokens(), target)
        entry, saved = self._cache.best(target) if self._cache is not None else (None, 0)
        gain = 1 if entry is not None and entry.seq is not None else MIN_RESTORE_GAIN
        restore = entry is not None and min(saved, n - 1) >= min(live, n - 1) + gain
        keep = min(saved if restore else live, n - 1)
        if llm.n_tokens - (0 if restore else keep) >= MIN_SAVE_TOKENS:
            self._save_live(key)
        if restore and entry is not None and not self._restore(entry):
            keep = min(common_prefix(self._live_tokens(), target), n - 1)
        if self._cache is not None and count:
            if keep > 0:
                self._cache.hits += 1
            else:
                self._cache.misses += 1
        if count:
            self.last_reused_tokens, self.last_evaluated_tokens = keep, n - keep
        llm.seq_rm(LIVE, keep, -1)
        self._live_key = key
        for first in range(keep, n, max(1, chunk)):
            if stop.is_set() or (yield_to is not None and yield_to()):
                return False
            self._live_dirty = True
            self._decode_live(tokens[first : first + chunk], first)
        return True

    def prefill(self, request: ChatRequest, stop: threading.Event, yield_to: Callable[[], bool] | None = None) -> int:
        """Evaluate the static prefix of ``request``'s prompt (``day_prefix_tokens``; no generation) and keep it:
        in a sequence of its own (pinned: dropped last) and, with a cache directory, on disk.

        Stops between two chunks of ``PREFILL_CHUNK`` tokens when ``stop`` is set or ``yield_to()`` is true
        (a user's request is waiting); what was evaluated stays in the live sequence for that request.
        Returns the length of the prefix now cached (0 when it was interrupted or does not fit).
        """
        tokens = self.day_prefix_tokens(request)
        self.last_prefill_tokens = 0
        if not tokens or len(tokens) + MIN_ANSWER_TOKENS > self.n_ctx:
            return 0
        key = prefix_key(np.asarray(tokens, dtype=np.int32))
        if not self._evaluate(tokens, key, stop, PREFILL_CHUNK, yield_to, count=False):
            self._live_key = None  # a partial prefix: not worth saving
            return 0
        if self._cache is not None:
            assert self._llm is not None
            entry = self._cache.get(key)
            if entry is None or entry.seq is None:
                seq = self._cache.slot_for(key)
                self._llm.seq_cp(LIVE, seq)
                entry = self._cache.put(key, np.asarray(tokens, dtype=np.int32), seq, pinned=True)
            self._live_dirty = False
            self._cache.touch(entry)
            llm, saved = self._llm, entry.seq
            self._cache.persist(entry, lambda: llm.get_state(saved) if saved is not None else None)
        self.last_prefill_tokens = len(tokens)
        return len(tokens)

    def cache_status(self) -> dict[str, Any]:
        """Saved prompts for diagnostics: entries in memory (sequences, tokens) and on disk, hits, misses, and how
        many prompt tokens the last turn reused and evaluated."""
        base = self._cache.status() if self._cache is not None else {"entries": 0, "tokens": 0}
        return {
            **base,
            "budget_bytes": self.cache_bytes,
            "kv_cells": self.n_cells,
            "cache_dir": str(self.cache_dir) if self.cache_dir is not None else None,
            "live_tokens": int(self._llm.n_tokens) if self._llm is not None else 0,
            "last_prompt_tokens": len(self.last_prompt_tokens),
            "last_reused_tokens": self.last_reused_tokens,
            "last_evaluated_tokens": self.last_evaluated_tokens,
            "last_prefill_tokens": self.last_prefill_tokens,
        }

    def clear_disk_cache(self) -> int:
        """Delete the prompt states written to the cache directory; how many files were deleted."""
        if self._cache is not None and self._cache.store is not None:
            return self._cache.clear_disk()
        return delete_cache_dir(self.cache_dir) if self.cache_dir is not None else 0

    # -- hearing and seeing through libmtmd ------------------------------------------------

    def media_chat(
        self,
        media: list[tuple[str, Any]],
        prompt: str,
        max_tokens: int,
        stop: threading.Event,
        system: str | None = None,
    ) -> str:
        """Answer ``prompt`` about audio (16 kHz float32 arrays) and images (RGB PIL images), greedy.

        ``media`` holds ("audio", samples) or ("image", image) in prompt order, each placed where
        its marker goes, before the question. libmtmd tokenizes only the media markers (with special
        tokens); the system prompt and the question are tokenized as plain text and evaluated around them.
        All of it goes to the media sequence, dropped afterwards: the conversations' prompts stay (when
        the cells run short, saved prompts are dropped first, then the live one).
        """
        import llama_cpp.mtmd_cpp as mtmd

        llm = self._llm
        if self._mtmd is None or llm is None:
            raise ModelCorrupt("no mmproj is loaded", path=self.info.path)
        head: list[Segment] = []
        if system:
            head += [("<|im_start|>system\n", True), (system, False), ("<|im_end|>\n", True)]
        head_tokens = self.tokenize_segments([*head, ("<|im_start|>user\n", True)])
        tail_tokens = self.tokenize_segments([(prompt, False), ("<|im_end|>\n", True), *ASSISTANT_OPENER])
        marker = mtmd.mtmd_default_marker().decode()
        text_bytes = "".join(f"{marker}\n" for _ in media).encode()
        bitmaps = [self._bitmap(kind, value) for kind, value in media]
        chunks = mtmd.mtmd_input_chunks_init()
        seq = self.media_seq
        try:
            text = mtmd.mtmd_input_text()
            text.text = text_bytes
            text.text_len = len(text_bytes)
            text.add_special = False
            text.parse_special = True  # the text is SARAi's media markers and newlines only
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            if mtmd.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(text), array, len(bitmaps)) != 0:
                raise ModelCorrupt("libmtmd could not tokenize the media", path=self.info.path)
            n_prompt = len(head_tokens) + int(mtmd.mtmd_helper_get_n_pos(chunks)) + len(tail_tokens)
            if n_prompt + MIN_ANSWER_TOKENS > self.n_ctx:
                raise ContextOverflow(
                    f"the media need {n_prompt} positions; the context holds {self.n_ctx}",
                    tokens=n_prompt,
                    n_ctx=self.n_ctx,
                )
            self.last_reused_tokens, self.last_evaluated_tokens = 0, n_prompt
            end = self._media_prompt(chunks, head_tokens, tail_tokens)
            self.last_prompt_tokens = head_tokens + tail_tokens  # the text around the media
            return self._generate(end, min(max_tokens, self.n_ctx - n_prompt - 1), stop)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
            llm.seq_rm(seq)

    def _media_prompt(self, chunks: Any, head_tokens: list[int], tail_tokens: list[int]) -> int:
        """Evaluate the media prompt in the media sequence; the next position. When the cells run short, saved
        prompts are dropped (then the live one) and it is evaluated again."""
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        llm = self._llm
        assert llm is not None and self._mtmd is not None
        seq = self.media_seq
        while True:
            llm.seq_rm(seq)
            try:
                start = llm.decode(head_tokens, 0, seq, logits_last=False)
                n_past = llama_cpp.llama_pos(start)
                if mtmd.mtmd_helper_eval_chunks(
                    self._mtmd, llm.ctx, chunks, start, seq, llm.n_batch, False, ctypes.byref(n_past)
                ):
                    raise DecodeError("libmtmd could not evaluate the media", no_room=True)
                return llm.decode(tail_tokens, n_past.value, seq, logits_last=True)
            except DecodeError as err:
                if not err.no_room:  # pragma: no cover - llama.cpp fails only for want of cells here
                    raise ModelCorrupt(f"llama.cpp could not evaluate the media: {err}", path=self.info.path) from err
                if self._make_room():
                    continue
                if llm.n_tokens:  # the live conversation goes last; its next turn evaluates it again
                    llm.seq_rm(LIVE)
                    self._live_key, self._live_dirty = None, False
                    continue
                raise ModelCorrupt("libmtmd could not evaluate the media", path=self.info.path) from err

    def _bitmap(self, kind: str, value: Any) -> Any:
        import llama_cpp.mtmd_cpp as mtmd

        if kind == "audio":
            samples = np.ascontiguousarray(value, dtype=np.float32)
            bitmap = mtmd.mtmd_bitmap_init_from_audio(
                samples.size, samples.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            )
        else:
            rgb = np.ascontiguousarray(np.asarray(value.convert("RGB"), dtype=np.uint8))
            height, width = rgb.shape[:2]
            bitmap = mtmd.mtmd_bitmap_init(width, height, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        if not bitmap:
            raise ModelCorrupt(f"libmtmd refused the {kind}", path=self.info.path)
        return bitmap

    def _generate(self, n_past: int, max_tokens: int, stop: threading.Event) -> str:
        """Greedy decoding in the media sequence after the media prompt was evaluated."""
        llm = self._llm
        assert llm is not None
        out = bytearray()
        for _ in range(max(0, max_tokens)):
            if stop.is_set():
                break
            token = llm.argmax()
            if llm.is_eog(token):
                break
            out += llm.detokenize([token], special=False)
            try:
                n_past = llm.decode([token], n_past, self.media_seq, logits_last=True, make_room=self._make_room)
            except DecodeError:  # pragma: no cover - a one-token batch after the prompt found its cells
                break
        return sanitize_text(out.decode("utf-8", errors="replace")).strip()
