"""Text chat (and, with an mmproj, hearing and seeing) on the Qwen2.5-Omni GGUF through llama-cpp-python."""

from __future__ import annotations

import codecs
import ctypes
import logging
import threading
from typing import Any

import numpy as np

from .errors import ContextOverflow, EngineError, InvalidInput, ModelCorrupt
from .grammar import check_gbnf, json_grammar
from .history import first_kept_turn, split_turns
from .manager import Backend, Emit
from .models import GGUFInfo, MMProjInfo, inspect_gguf, inspect_mmproj
from .text import sanitize_text
from .tools import ASSISTANT_OPENER, TOOL_CLOSE, TOOL_OPEN, Segment, message_segments, system_segments
from .types import ChatRequest

_LOGGER = logging.getLogger(__name__)

MTMD_COMPUTE_BYTES = 64 * 1024 * 1024
MIN_ANSWER_TOKENS = 8  # below this much room for the answer the prompt does not fit


class LlamaBackend(Backend):
    """A GGUF loaded with llama-cpp-python (memory-mapped weights, KV cache for n_ctx), plus its mmproj.

    The mmproj (audio + vision encoders) shares the text weights through libmtmd; it is loaded and
    evicted together with the text model.
    """

    kind = "gguf"

    def __init__(
        self, name: str, path: str, n_ctx: int, n_threads: int | None = None, mmproj: str | None = None
    ) -> None:
        """Validate the headers now; load later."""
        super().__init__(name)
        self.info: GGUFInfo = inspect_gguf(path)
        self.mmproj: MMProjInfo | None = inspect_mmproj(mmproj, self.info) if mmproj else None
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self._llm: Any = None
        self._mtmd: Any = None
        self.last_prompt_tokens: list[int] = []  # what the last chat evaluated (benchmarks compare against it)
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
        """File size (mmap) + f16 KV cache + a compute buffer (+ the mmproj and its compute buffer)."""
        total = self.info.size_bytes + self.info.kv_cache_bytes(self.n_ctx) + 32 * 1024 * 1024
        if self.mmproj is not None:
            total += self.mmproj.size_bytes + MTMD_COMPUTE_BYTES
        return total

    def load(self) -> None:
        """Load with llama-cpp-python (raises ModelCorrupt when llama.cpp refuses)."""
        import llama_cpp

        inspect_gguf(self.info.path)  # the file may have changed since setup
        try:
            self._llm = llama_cpp.Llama(
                model_path=self.info.path,
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                use_mmap=True,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as err:
            raise ModelCorrupt(f"llama.cpp cannot load {self.info.path}: {err}", path=self.info.path) from err
        # <tool_call> / </tool_call> may be special tokens: the only ones whose text a reply keeps
        # (the tool-call parser needs it); every other special token is generated as nothing.
        ids = [self._llm.tokenize(tag.encode(), add_bos=False, special=True) for tag in (TOOL_OPEN, TOOL_CLOSE)]
        self._tool_tokens = frozenset(t[0] for t in ids if len(t) == 1)
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
        params.n_threads = self._llm.n_threads
        ctx = mtmd.mtmd_init_from_file(self.mmproj.path.encode(), self._llm.model, params)
        if not ctx:
            raise ModelCorrupt(f"libmtmd cannot load the mmproj {self.mmproj.path}", path=self.mmproj.path)
        self._mtmd = ctx

    def unload(self) -> None:
        """Free the mmproj, the model and its KV cache."""
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
        system = head[0] if head else None
        fixed = self.tokenize_segments(system_segments(system, request.tools))
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

    def grammar(self, schema: dict[str, Any]) -> Any:
        """A LlamaGrammar for ``schema``, checked in Python and by llama.cpp's own parser before any sampling."""
        import llama_cpp

        grammar = llama_cpp.LlamaGrammar.from_string(json_grammar(schema), verbose=False)  # type: ignore[attr-defined]
        self.check_grammar(grammar._grammar, grammar._root)
        return grammar

    def check_grammar(self, text: str, root: str = "root") -> None:
        """Refuse (InvalidInput) a GBNF text that our checker or llama.cpp's parser rejects.

        llama-cpp-python adds whatever ``llama_sampler_init_grammar`` returns to the sampler chain;
        a NULL there (a grammar llama.cpp could not parse, or a left-recursive one) crashes sampling.
        """
        import llama_cpp

        check_gbnf(text, root)
        vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), root.encode())
        if not sampler:
            raise InvalidInput("llama.cpp refused the grammar", key="structure_invalid")
        llama_cpp.llama_sampler_free(sampler)

    def chat(self, request: ChatRequest, emit: Emit, stop: threading.Event) -> None:
        """Stream raw completion text for a chat request; stops at the next token when asked.

        llama-cpp-python keeps the KV cache of the previous prompt and only evaluates the new
        suffix, so the next turn of the same conversation reuses the shared prefix.
        """
        import llama_cpp

        grammar = self.grammar(request.json_schema) if request.json_schema is not None else None
        tokens = self.prompt_tokens(request)
        room = self.n_ctx - len(tokens)
        # Our own token loop (not create_completion's stream): a stop request is honoured at the
        # next token, and text is decoded incrementally (linear, even when a model emits partial
        # UTF-8 for a long time). Special tokens come out as nothing, but <tool_call> tags.
        vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        budget = min(request.max_tokens, room - 1)
        produced: list[int] = []
        self.last_prompt_tokens = list(tokens)
        self.last_output_tokens = produced
        for token in self._llm.generate(
            tokens, temp=request.temperature, top_k=40, top_p=0.95, min_p=0.05, grammar=grammar
        ):
            if stop.is_set() or llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            produced.append(token)
            text = decoder.decode(self._llm.detokenize([token], special=token in self._tool_tokens))
            if text:
                emit(text)
            if len(produced) >= budget:
                break
        self.last_generated = len(produced)
        tail = decoder.decode(b"", final=True)
        if tail:
            emit(tail)

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
        """
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        if self._mtmd is None:
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
        ctx = self._llm._ctx.ctx
        memory = llama_cpp.llama_get_memory(ctx)
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
            llama_cpp.llama_memory_clear(memory, True)
            self._llm.reset()
            start = self._decode(head_tokens, 0, logits_last=False)
            n_past = llama_cpp.llama_pos(start)
            if mtmd.mtmd_helper_eval_chunks(
                self._mtmd, ctx, chunks, start, 0, self._llm.n_batch, False, ctypes.byref(n_past)
            ):
                raise ModelCorrupt("libmtmd could not evaluate the media", path=self.info.path)
            end = self._decode(tail_tokens, n_past.value, logits_last=True)
            self.last_prompt_tokens = head_tokens + tail_tokens  # the text around the media
            return self._generate(end, min(max_tokens, self.n_ctx - n_prompt - 1), stop)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
            llama_cpp.llama_memory_clear(memory, True)
            self._llm.reset()

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

    def _decode(self, tokens: list[int], n_past: int, *, logits_last: bool) -> int:
        """Evaluate text tokens at positions ``n_past``...; return the next position."""
        import llama_cpp

        ctx = self._llm._ctx.ctx
        n_batch = max(1, int(self._llm.n_batch))
        batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        try:
            for first in range(0, len(tokens), n_batch):
                part = tokens[first : first + n_batch]
                batch.n_tokens = len(part)
                for i, token in enumerate(part):
                    batch.token[i] = token
                    batch.pos[i] = n_past + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = logits_last and first + i == len(tokens) - 1
                if llama_cpp.llama_decode(ctx, batch) != 0:  # pragma: no cover - the size was checked before
                    raise ModelCorrupt("llama.cpp could not evaluate the prompt", path=self.info.path)
                n_past += len(part)
        finally:
            llama_cpp.llama_batch_free(batch)
        return n_past

    def _generate(self, n_past: int, max_tokens: int, stop: threading.Event) -> str:
        """Greedy decoding after the media prompt was evaluated."""
        import llama_cpp

        ctx = self._llm._ctx.ctx
        vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        batch = llama_cpp.llama_batch_init(1, 0, 1)
        out = bytearray()
        try:
            for _ in range(max(0, max_tokens)):
                if stop.is_set():
                    break
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
                token = int(np.argmax(logits))
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                out += self._llm.detokenize([token], special=False)
                batch.n_tokens = 1
                batch.token[0] = token
                batch.pos[0] = n_past
                batch.n_seq_id[0] = 1
                batch.seq_id[0][0] = 0
                batch.logits[0] = True
                if llama_cpp.llama_decode(ctx, batch) != 0:
                    break
                n_past += 1
        finally:
            llama_cpp.llama_batch_free(batch)
        return sanitize_text(out.decode("utf-8", errors="replace")).strip()
