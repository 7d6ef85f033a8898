"""Text chat (and, with an mmproj, hearing and seeing) on the Qwen2.5-Omni GGUF through llama-cpp-python."""

from __future__ import annotations

import codecs
import ctypes
import json
import threading
from typing import Any

import numpy as np

from .errors import ContextOverflow, EngineError, ModelCorrupt
from .manager import Backend, Emit
from .models import GGUFInfo, MMProjInfo, inspect_gguf, inspect_mmproj
from .tools import render_chatml
from .types import ChatRequest

MTMD_COMPUTE_BYTES = 64 * 1024 * 1024


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

    def chat(self, request: ChatRequest, emit: Emit, stop: threading.Event) -> None:
        """Stream raw completion text for a chat request; stops at the next token when asked.

        llama-cpp-python keeps the KV cache of the previous prompt and only evaluates the new
        suffix, so the next turn of the same conversation reuses the shared prefix.
        """
        prompt = render_chatml(request.messages, request.tools)
        tokens = self._llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        room = self.n_ctx - len(tokens)
        if room < 8:
            raise ContextOverflow(
                f"the prompt has {len(tokens)} tokens; the context holds {self.n_ctx}",
                tokens=len(tokens),
                n_ctx=self.n_ctx,
            )
        import llama_cpp

        grammar = None
        if request.json_schema is not None:
            grammar = llama_cpp.LlamaGrammar.from_json_schema(  # type: ignore[attr-defined]
                json.dumps(request.json_schema), verbose=False
            )
        # Our own token loop (not create_completion's stream): a stop request is honoured at the
        # next token, and text is decoded incrementally (linear, even when a model emits partial
        # UTF-8 for a long time).
        vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        budget = min(request.max_tokens, room - 1)
        produced = 0
        self.last_prompt_tokens = list(tokens)
        for token in self._llm.generate(
            tokens, temp=request.temperature, top_k=40, top_p=0.95, min_p=0.05, grammar=grammar
        ):
            if stop.is_set() or llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            text = decoder.decode(self._llm.detokenize([token], special=True))
            if text:
                emit(text)
            produced += 1
            if produced >= budget:
                break
        self.last_generated = produced
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
        its marker goes, before the question.
        """
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        if self._mtmd is None:
            raise ModelCorrupt("no mmproj is loaded", path=self.info.path)
        marker = mtmd.mtmd_default_marker().decode()
        parts = []
        if system:
            parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
        parts.append("<|im_start|>user\n" + "".join(f"{marker}\n" for _ in media))
        parts.append(f"{prompt}<|im_end|>\n<|im_start|>assistant\n")
        text_bytes = "".join(parts).encode()
        bitmaps = [self._bitmap(kind, value) for kind, value in media]
        chunks = mtmd.mtmd_input_chunks_init()
        ctx = self._llm._ctx.ctx
        memory = llama_cpp.llama_get_memory(ctx)
        try:
            text = mtmd.mtmd_input_text()
            text.text = text_bytes
            text.text_len = len(text_bytes)
            text.add_special = False
            text.parse_special = True
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            if mtmd.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(text), array, len(bitmaps)) != 0:
                raise ModelCorrupt("libmtmd could not tokenize the media", path=self.info.path)
            n_prompt = int(mtmd.mtmd_helper_get_n_pos(chunks))
            if n_prompt + 8 > self.n_ctx:
                raise ContextOverflow(
                    f"the media need {n_prompt} positions; the context holds {self.n_ctx}",
                    tokens=n_prompt,
                    n_ctx=self.n_ctx,
                )
            llama_cpp.llama_memory_clear(memory, True)
            self._llm.reset()
            n_past = llama_cpp.llama_pos(0)
            if mtmd.mtmd_helper_eval_chunks(
                self._mtmd, ctx, chunks, 0, 0, self._llm.n_batch, True, ctypes.byref(n_past)
            ):
                raise ModelCorrupt("libmtmd could not evaluate the media", path=self.info.path)
            return self._generate(n_past.value, min(max_tokens, self.n_ctx - n_prompt - 1), stop)
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
        return out.decode("utf-8", errors="replace").strip()
