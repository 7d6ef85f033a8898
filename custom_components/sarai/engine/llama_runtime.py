"""One GGUF in llama.cpp: the model, one context whose KV cache holds several sequences, decoding and sampling.

llama-cpp-python's ``Llama`` keeps one sequence per context and clears every sequence's cells past its own
length before each evaluation; SARAi keeps several prompts in one KV cache instead (the live conversation,
saved conversations, prefilled prefixes, a media turn), so it drives llama.cpp through the C API:

- the KV cache is *unified*: every sequence may use any cell, and a copy of a sequence
  (``llama_memory_seq_cp``) only tags the same cells with one more sequence id; nothing is copied. A
  conversation that continues a prefilled prefix shares the prefix's cells, and switching between two
  conversations costs microseconds;
- the cells are bounded (``n_cells``); when a batch finds no free cell, ``make_room`` is asked to drop a
  saved sequence, and the batch is tried again (llama.cpp places a batch whole or not at all);
- sequence 0 is the live one (``input_ids[:n_tokens]`` are its tokens).
"""

from __future__ import annotations

from collections.abc import Callable
import ctypes
import os
import threading
from typing import Any

import numpy as np

LIVE = 0  # the sequence a chat evaluates and generates in
DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's "random seed"

_init_lock = threading.Lock()
_initialized = False


class DecodeError(RuntimeError):
    """llama.cpp could not evaluate a batch (``no_room``: not even after every saved sequence was dropped)."""

    def __init__(self, message: str, *, no_room: bool = False) -> None:
        """A decode failure."""
        super().__init__(message)
        self.no_room = no_room


def _backend_init() -> None:
    global _initialized  # llama.cpp's process-wide initialisation, once
    import llama_cpp

    with _init_lock:
        if not _initialized:
            llama_cpp.llama_backend_init()
            _initialized = True


class LlamaRuntime:
    """A loaded GGUF: tokenizer, a context of ``n_cells`` KV cells shared by ``n_seq`` sequences, a batch.

    ``n_ctx`` is the longest prompt + answer of one sequence (what the user configured); ``n_cells`` (at least
    ``n_ctx``) is what all sequences hold together. Raises ValueError when llama.cpp refuses the file or the
    context.
    """

    def __init__(
        self, path: str, *, n_ctx: int, n_cells: int, n_seq: int, n_threads: int | None, n_batch: int = 512
    ) -> None:
        """Load the model (memory-mapped) and create the context."""
        import llama_cpp
        from llama_cpp import _internals as internals

        _backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_mmap = True
        self._model: Any = internals.LlamaModel(path_model=path, params=model_params, verbose=False)
        self.n_ctx = n_ctx
        self.n_batch = max(1, min(n_batch, n_ctx))
        self.n_threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = max(n_cells, n_ctx)
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = max(1, n_seq)
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = self.n_threads
        params.no_perf = False
        # Flash attention: llama.cpp's default (auto: on for CPU). llama-cpp-python's Llama turns it off, which
        # materialises the attention scores for every cell: with the saved prompts' cells that compute buffer
        # grows with them (SmolLM2-135M at 24,576 cells: 494 MB off, 98 MB on; a 7B model ~3x more).
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        try:
            self._ctx: Any = internals.LlamaContext(model=self._model, params=params, verbose=False)
        except ValueError:
            self._model.close()  # type: ignore[no-untyped-call]
            raise
        self.n_cells = int(llama_cpp.llama_n_ctx(self._ctx.ctx))
        self.n_seq = int(llama_cpp.llama_n_seq_max(self._ctx.ctx))
        self.model = self._model.model
        self.vocab = self._model.vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.input_ids = np.zeros(n_ctx, dtype=np.intc)  # the live sequence's tokens
        self.n_tokens = 0

    @property
    def ctx(self) -> Any:
        """The llama_context pointer."""
        return self._ctx.ctx

    def close(self) -> None:
        """Free the batch, the context and the model."""
        import llama_cpp

        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        self._ctx.close()
        self._model.close()

    # -- tokens ---------------------------------------------------------------------------------

    def tokenize(self, text: bytes, add_bos: bool = False, special: bool = False) -> list[int]:
        """Tokens of UTF-8 text; ``special``: parse special tokens' text as those tokens."""
        return list(self._model.tokenize(text, add_bos, special))

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        """The bytes of tokens (special tokens as their text when ``special``)."""
        return bytes(self._model.detokenize(list(tokens), special=special))

    def is_eog(self, token: int) -> bool:
        """Whether a token ends generation."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    # -- sequences ----------------------------------------------------------------------------

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        """Drop a sequence's cells at positions [p0, p1) (all of them by default)."""
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(self.memory, seq, p0, p1)
        if seq == LIVE:
            self.n_tokens = 0 if p0 <= 0 else min(self.n_tokens, p0)

    def seq_cp(self, src: int, dst: int) -> None:
        """Make ``dst`` hold exactly ``src``'s cells (shared, not copied)."""
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(self.memory, dst, -1, -1)
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def seq_length(self, seq: int) -> int:
        """Positions a sequence holds (0 when empty)."""
        import llama_cpp

        return int(llama_cpp.llama_memory_seq_pos_max(self.memory, seq)) + 1

    def get_state(self, seq: int) -> bytearray | None:
        """A copy of one sequence's KV cache (for a file); None when empty."""
        import llama_cpp

        size = int(llama_cpp.llama_state_seq_get_size(self.ctx, seq))
        if size <= 0:
            return None
        data = bytearray(size)
        got = int(llama_cpp.llama_state_seq_get_data(self.ctx, (ctypes.c_uint8 * size).from_buffer(data), size, seq))
        if got <= 0:  # pragma: no cover - llama.cpp reports the size it then writes
            return None
        del data[got:]
        return data

    def set_state(self, seq: int, data: bytearray) -> bool:
        """Load a copy made by ``get_state`` into a sequence; False (the sequence empty) when llama.cpp refuses it."""
        import llama_cpp

        self.seq_rm(seq)
        size = len(data)
        done = int(llama_cpp.llama_state_seq_set_data(self.ctx, (ctypes.c_uint8 * size).from_buffer(data), size, seq))
        if done != size:
            self.seq_rm(seq)
            return False
        return True

    # -- evaluation -----------------------------------------------------------------------------

    def decode(
        self,
        tokens: list[int],
        pos: int,
        seq: int,
        *,
        logits_last: bool,
        make_room: Callable[[], bool] | None = None,
    ) -> int:
        """Evaluate tokens at positions ``pos``... of a sequence, ``n_batch`` at a time; return the next position.

        When llama.cpp finds no free cell for a batch, ``make_room()`` drops a saved sequence and the batch is
        tried again; DecodeError(no_room=True) when nothing more can be dropped.
        """
        import llama_cpp

        batch = self._batch
        for first in range(0, len(tokens), self.n_batch):
            part = tokens[first : first + self.n_batch]
            batch.n_tokens = len(part)
            last = len(tokens) - 1
            for i, token in enumerate(part):
                batch.token[i] = token
                batch.pos[i] = pos + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits_last and first + i == last
            rc = llama_cpp.llama_decode(self.ctx, batch)
            while rc == 1 and make_room is not None and make_room():
                rc = llama_cpp.llama_decode(self.ctx, batch)
            if rc != 0:
                raise DecodeError(f"llama_decode returned {rc}", no_room=rc == 1)
            if seq == LIVE:
                self.input_ids[pos : pos + len(part)] = part
                self.n_tokens = pos + len(part)
            pos += len(part)
        return pos

    def live_tokens(self) -> np.ndarray:
        """The live sequence's tokens."""
        return np.asarray(self.input_ids[: self.n_tokens], dtype=np.int32)

    def set_live(self, tokens: np.ndarray) -> None:
        """Record the live sequence's tokens after its cells were replaced (a copy of a saved sequence)."""
        n = len(tokens)
        self.input_ids[:n] = tokens
        self.n_tokens = n

    def sampler(self, temperature: float, grammar: tuple[str, str] | None = None, seed: int = DEFAULT_SEED) -> Any:
        """A sampler chain (free it with ``free_sampler``): the grammar first, then greedy at temperature 0,
        else top-k 40, top-p 0.95, min-p 0.05, the temperature and a random draw (llama-cpp-python's defaults)."""
        import llama_cpp

        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if grammar is not None:
            text, root = grammar
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_grammar(self.vocab, text.encode(), root.encode())
            )
        if temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            for sampler in (
                llama_cpp.llama_sampler_init_top_k(40),
                llama_cpp.llama_sampler_init_top_p(0.95, 1),
                llama_cpp.llama_sampler_init_min_p(0.05, 1),
                llama_cpp.llama_sampler_init_temp(temperature),
                llama_cpp.llama_sampler_init_dist(seed),
            ):
                llama_cpp.llama_sampler_chain_add(chain, sampler)
        return chain

    def sample(self, chain: Any) -> int:
        """Sample (and accept) the next token from the last evaluated logits."""
        import llama_cpp

        return int(llama_cpp.llama_sampler_sample(chain, self.ctx, -1))

    @staticmethod
    def free_sampler(chain: Any) -> None:
        """Free a sampler chain (and the samplers in it)."""
        import llama_cpp

        llama_cpp.llama_sampler_free(chain)

    def argmax(self) -> int:
        """The most likely next token after the last evaluated logits (greedy)."""
        import llama_cpp

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        return int(np.argmax(logits))
