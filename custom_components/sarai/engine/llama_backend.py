"""Text chat on the Qwen2.5-Omni GGUF through llama-cpp-python."""

from __future__ import annotations

import json
import threading
from typing import Any

from .errors import ContextOverflow, ModelCorrupt
from .manager import Backend, Emit
from .models import GGUFInfo, inspect_gguf
from .tools import render_chatml
from .types import ChatRequest

STOP_STRINGS = ["<|im_end|>", "<|endoftext|>"]


class LlamaBackend(Backend):
    """A GGUF loaded with llama-cpp-python (memory-mapped weights, KV cache for n_ctx)."""

    kind = "gguf"

    def __init__(self, name: str, path: str, n_ctx: int, n_threads: int | None = None) -> None:
        """Validate the header now; load later."""
        super().__init__(name)
        self.info: GGUFInfo = inspect_gguf(path)
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self._llm: Any = None

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory."""
        return self._llm is not None

    def estimate_bytes(self) -> int:
        """File size (mmap) + f16 KV cache + a compute buffer."""
        return self.info.size_bytes + self.info.kv_cache_bytes(self.n_ctx) + 32 * 1024 * 1024

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

    def unload(self) -> None:
        """Free the model and its KV cache."""
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` (special tokens parsed)."""
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def chat(self, request: ChatRequest, emit: Emit, stop: threading.Event) -> None:
        """Stream raw completion text for a chat request; stops at the next token when asked."""
        prompt = render_chatml(request.messages, request.tools)
        tokens = self._llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        room = self.n_ctx - len(tokens)
        if room < 8:
            raise ContextOverflow(
                f"the prompt has {len(tokens)} tokens; the context holds {self.n_ctx}",
                tokens=len(tokens),
                n_ctx=self.n_ctx,
            )
        grammar = None
        if request.json_schema is not None:
            import llama_cpp

            grammar = llama_cpp.LlamaGrammar.from_json_schema(  # type: ignore[attr-defined]
                json.dumps(request.json_schema), verbose=False
            )
        stream = self._llm.create_completion(
            tokens,
            max_tokens=min(request.max_tokens, room - 1),
            temperature=request.temperature,
            stop=STOP_STRINGS,
            stream=True,
            grammar=grammar,
        )
        try:
            for chunk in stream:
                if stop.is_set():
                    break
                text = chunk["choices"][0]["text"]
                if text:
                    emit(text)
        finally:
            stream.close()
