"""Inspect model files without loading them: GGUF headers, Omni checkpoints, size estimates."""

from __future__ import annotations

from dataclasses import dataclass
import json
import os
from pathlib import Path
import struct
from typing import Any, BinaryIO

from .errors import ModelCorrupt, ModelMissing
from .files import file_size, open_regular, read_regular, resolve_regular

GGUF_MAGIC = b"GGUF"
TEXT_ARCHITECTURES = ("qwen2vl", "qwen2")
MMPROJ_ARCHITECTURES = ("clip",)
OMNI_MODEL_TYPE = "qwen2_5_omni"
MB = 1024 * 1024

# Published Qwen2.5-Omni GGUF sizes (MB, rounded) used for advice and for estimates when a
# file is not at hand. The estimate of a real file always uses its real size.
VARIANTS: dict[str, dict[str, int]] = {
    "7B": {"Q4_K_M": 4680, "Q5_K_M": 5440, "Q6_K": 6250, "Q8_0": 8100, "mmproj_Q8_0": 1550},
    "3B": {"Q4_K_M": 1930, "Q5_K_M": 2220, "Q6_K": 2540, "Q8_0": 3290, "mmproj_Q8_0": 1290},
}

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING = 8
_ARRAY = 9
_MAX_STRING = 64 * MB
_MAX_DEPTH = 4  # nested arrays
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64
DEFAULT_ALIGNMENT = 32

# ggml type -> (elements per block, bytes per block), for the types llama.cpp reads (ggml.h,
# ggml-common.h; the tests compare it with the bundled libggml's ggml_blck_size/ggml_type_size).
# Removed ids (4, 5, 31-33, 36-38) and ids this table does not know are corrupt.
GGML_TYPES: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
    40: (64, 36),  # NVFP4
    41: (128, 18),  # Q1_0
    42: (64, 18),  # Q2_0
}


@dataclass(slots=True, frozen=True)
class TensorInfo:
    """One tensor of a GGUF file, as its header describes it."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section

    @property
    def n_bytes(self) -> int:
        """Bytes of the tensor's data (``ggml_nbytes`` for a contiguous tensor)."""
        block, size = GGML_TYPES[self.ggml_type]
        count = 1
        for dim in self.dims:
            count *= dim
        return count // block * size


@dataclass(slots=True, frozen=True)
class GGUFFile:
    """A GGUF header: scalar metadata, tensor infos and where the data section starts."""

    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_start: int
    size_bytes: int


@dataclass(slots=True, frozen=True)
class GGUFInfo:
    """What a GGUF header says."""

    path: str
    architecture: str
    size_bytes: int
    context_length: int | None
    block_count: int | None
    embedding_length: int | None
    head_count: int | None
    head_count_kv: int | None
    name: str | None

    def kv_cache_bytes(self, n_ctx: int) -> int:
        """f16 K and V for every layer at ``n_ctx`` (llama.cpp's default cache type)."""
        if not (self.block_count and self.embedding_length and self.head_count):
            return 0
        head_dim = self.embedding_length // self.head_count
        kv_heads = self.head_count_kv or self.head_count
        return 2 * self.block_count * n_ctx * kv_heads * head_dim * 2


class _Reader:
    """Bounded reads from a GGUF header: every length and count is checked against the file size."""

    def __init__(self, fh: BinaryIO, path: str, size: int) -> None:
        self.fh = fh
        self.path = path
        self.size = size

    def corrupt(self, detail: str) -> ModelCorrupt:
        return ModelCorrupt(f"{self.path}: {detail}", path=self.path)

    def remaining(self) -> int:
        return self.size - self.fh.tell()

    def read(self, n: int) -> bytes:
        if n > self.remaining():
            raise self.corrupt("truncated GGUF header")
        data = self.fh.read(n)
        if len(data) != n:  # pragma: no cover - the file shrank while it was read
            raise self.corrupt("truncated GGUF header")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self, limit: int = _MAX_STRING) -> str:
        length = self.unpack("<Q")
        if length > min(limit, self.remaining()):
            raise self.corrupt(f"implausible string length {length} in GGUF header")
        return self.read(length).decode("utf-8", errors="replace")

    def count(self, n: int, min_item_bytes: int, what: str) -> int:
        """Refuse a count that cannot fit in what is left of the file (no loop runs away)."""
        if n * min_item_bytes > self.remaining():
            raise self.corrupt(f"implausible {what} count {n} in GGUF header")
        return n

    def value(self, vtype: int, depth: int = 0) -> Any:
        """Read one metadata value; arrays are skipped (returned as None)."""
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY and depth < _MAX_DEPTH:
            itype = self.unpack("<I")
            n = self.unpack("<Q")
            if itype in _SCALAR:
                nbytes = self.count(n, struct.calcsize(_SCALAR[itype]), "array") * struct.calcsize(_SCALAR[itype])
                self.fh.seek(nbytes, os.SEEK_CUR)
            elif itype in (_STRING, _ARRAY):
                for _ in range(self.count(n, 8 if itype == _STRING else 12, "array")):
                    self.value(itype, depth + 1)
            else:
                raise self.corrupt(f"unknown GGUF array type {itype}")
            return None
        raise self.corrupt(f"unknown GGUF value type {vtype}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF header (metadata and tensor infos) and check that every tensor lies inside the file.

    Only regular files are opened (``files.open_regular``). Counts, lengths and dimensions are
    bounded by the file size, so a hostile header cannot make this allocate or loop without end.
    A file cut short (a download or copy that stopped) is ``ModelCorrupt`` with the ``model_truncated``
    key; an unknown tensor type or a misaligned offset is ``ModelCorrupt``.
    """
    p = str(path)
    with open_regular(p, missing=ModelMissing, not_regular=ModelCorrupt) as fh:
        r = _Reader(fh, p, file_size(fh))
        if r.remaining() < 4 or fh.read(4) != GGUF_MAGIC:
            raise ModelCorrupt(f"{p} is not a GGUF file", path=p)
        version, n_tensors, n_kv = struct.unpack("<IQQ", r.read(20))
        if version not in (2, 3):
            raise ModelCorrupt(f"unsupported GGUF version {version}", path=p)
        meta: dict[str, Any] = {}
        for _ in range(r.count(n_kv, 13, "metadata")):
            key = r.string()
            value = r.value(r.unpack("<I"))
            if value is not None:
                meta[key] = value
        tensors: list[TensorInfo] = []
        for _ in range(r.count(n_tensors, 24, "tensor")):
            name = r.string(GGML_MAX_NAME - 1)
            n_dims = r.unpack("<I")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise r.corrupt(f"tensor {name!r} has {n_dims} dimensions")
            dims = tuple(r.unpack("<Q") for _ in range(n_dims))
            ggml_type = r.unpack("<I")
            offset = r.unpack("<Q")
            if ggml_type not in GGML_TYPES:
                raise r.corrupt(f"tensor {name!r} has the unknown ggml type {ggml_type}")
            if any(d >= 1 << 62 for d in dims) or dims[0] % GGML_TYPES[ggml_type][0]:
                raise r.corrupt(f"tensor {name!r} has impossible dimensions {dims}")
            tensors.append(TensorInfo(name, dims, ggml_type, offset))
        alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise r.corrupt(f"general.alignment {alignment!r} is not a power of two")
        header_end = fh.tell()
    data_start = (header_end + alignment - 1) // alignment * alignment
    needed = data_start
    for tensor in tensors:
        if tensor.offset % alignment:
            raise ModelCorrupt(f"{p}: tensor {tensor.name!r} is not aligned to {alignment} bytes", path=p)
        needed = max(needed, data_start + tensor.offset + tensor.n_bytes)
    if needed > r.size:
        raise ModelCorrupt(
            f"{p} is truncated: {r.size} bytes on disk, its tensors need {needed}",
            key="model_truncated",
            path=p,
            size_mb=f"{r.size / MB:.1f}",
            needed_mb=f"{needed / MB:.1f}",
        )
    return GGUFFile(meta, tuple(tensors), data_start, r.size)


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Return the scalar metadata of a GGUF file (arrays are skipped), after checking the whole layout."""
    return read_gguf(path).metadata


def inspect_gguf(path: str | Path, allowed: tuple[str, ...] = TEXT_ARCHITECTURES) -> GGUFInfo:
    """Validate a GGUF file: a regular file, GGUF magic, every tensor inside the file, an allowed architecture."""
    gguf = read_gguf(path)
    meta = gguf.metadata
    arch = str(meta.get("general.architecture", ""))
    if arch not in allowed:
        raise ModelCorrupt(
            f"unsupported architecture {arch!r} (expected {', '.join(allowed)})",
            path=str(path),
            architecture=arch,
        )

    def _int(key: str) -> int | None:
        value = meta.get(f"{arch}.{key}")
        return int(value) if isinstance(value, int) else None

    return GGUFInfo(
        path=str(path),
        architecture=arch,
        size_bytes=gguf.size_bytes,
        context_length=_int("context_length"),
        block_count=_int("block_count"),
        embedding_length=_int("embedding_length"),
        head_count=_int("attention.head_count"),
        head_count_kv=_int("attention.head_count_kv"),
        name=meta.get("general.name"),
    )


@dataclass(slots=True, frozen=True)
class MMProjInfo:
    """What an mmproj (clip) GGUF header says: which encoders, and for which text width."""

    path: str
    size_bytes: int
    projector: str
    has_audio: bool
    has_vision: bool
    projection_dim: int | None


def inspect_mmproj(path: str | Path, text: GGUFInfo | None = None) -> MMProjInfo:
    """Validate an mmproj GGUF (as ``inspect_gguf``); with ``text``, check that it projects into that model's width."""
    gguf = read_gguf(path)
    meta = gguf.metadata
    if meta.get("general.architecture") not in MMPROJ_ARCHITECTURES:
        raise ModelCorrupt(f"{path} is not an mmproj (clip) GGUF", path=str(path))
    has_audio = bool(meta.get("clip.has_audio_encoder", False))
    has_vision = bool(meta.get("clip.has_vision_encoder", False))
    if not (has_audio or has_vision):
        raise ModelCorrupt(f"{path} has neither an audio nor a vision encoder", path=str(path))
    dims = [meta.get(f"clip.{m}.projection_dim") for m in ("audio", "vision")]
    projection = next((int(d) for d in dims if isinstance(d, int)), None)
    info = MMProjInfo(
        path=str(path),
        size_bytes=gguf.size_bytes,
        projector=str(meta.get("clip.projector_type", "")),
        has_audio=has_audio,
        has_vision=has_vision,
        projection_dim=projection,
    )
    if text is not None and projection and text.embedding_length and projection != text.embedding_length:
        raise ModelCorrupt(
            f"the mmproj projects to width {projection} but the text model is {text.embedding_length} wide: "
            "it belongs to another model (7B and 3B files cannot be mixed)",
            path=str(path),
            mismatch="width",
        )
    return info


@dataclass(slots=True, frozen=True)
class OmniInfo:
    """What a transformers Qwen2.5-Omni checkpoint directory holds."""

    path: str
    parameters: int
    thinker_parameters: int
    voices: tuple[str, ...]

    def estimate_bytes(self, dtype_bytes: float, with_talker: bool) -> int:
        """Resident bytes for the weights in a given dtype (plus 10 % for activations)."""
        params = self.parameters if with_talker else self.thinker_parameters
        return int(params * dtype_bytes * 1.1)


def _safetensors_header(file: Path) -> tuple[dict[str, Any], int, int]:
    """(header, header length, file size) of a safetensors file, read from a regular file only."""
    with open_regular(file, missing=ModelMissing, not_regular=ModelCorrupt) as fh:
        size = file_size(fh)
        r = _Reader(fh, str(file), size)
        header_len = r.unpack("<Q")
        if header_len > min(256 * MB, r.remaining()):
            raise ModelCorrupt(f"bad safetensors header in {file}", path=str(file))
        try:
            header = json.loads(r.read(header_len))
        except ValueError as err:
            raise ModelCorrupt(f"cannot parse the header of {file}: {err}", path=str(file)) from err
    if not isinstance(header, dict):
        raise ModelCorrupt(f"bad safetensors header in {file}", path=str(file))
    return header, header_len, size


def _count_safetensors_params(directory: Path) -> dict[str, int]:
    """Count parameters per top-level module from safetensors headers, without loading."""
    counts: dict[str, int] = {}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelMissing(f"no safetensors weights in {directory}", path=str(directory))
    for file in files:
        header, header_len, size = _safetensors_header(file)
        try:
            specs = [(k, s) for k, s in header.items() if k != "__metadata__"]
            data_end = max((int(s["data_offsets"][1]) for _, s in specs), default=0)
            shapes = [(name, [int(d) for d in spec.get("shape", [])]) for name, spec in specs]
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise ModelCorrupt(f"bad tensor entry in {file}: {err}", path=str(file)) from err
        if 8 + header_len + data_end > size:
            raise ModelCorrupt(
                f"{file.name} is truncated",
                key="model_truncated",
                path=str(file),
                size_mb=f"{size / MB:.1f}",
                needed_mb=f"{(8 + header_len + data_end) / MB:.1f}",
            )
        for name, shape in shapes:
            n = 1
            for dim in shape:
                n *= dim
            top = name.split(".", 1)[0]
            counts[top] = counts.get(top, 0) + n
    return counts


def _check_regular_files(directory: Path) -> None:
    """Every file in the checkpoint directory is a regular file (transformers reads them without asking)."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as err:  # pragma: no cover - a directory that vanished or is unreadable (tests run as root)
        raise ModelMissing(f"cannot list {directory}: {err.strerror}", path=str(directory)) from err
    for entry in entries:
        try:
            if entry.is_dir():
                continue
        except OSError:  # pragma: no cover - a broken entry; resolve_regular says what it is
            pass
        resolve_regular(entry.path, missing=ModelMissing, not_regular=ModelCorrupt)


def inspect_omni(path: str | Path) -> OmniInfo:
    """Validate a Qwen2.5-Omni checkpoint directory without loading it."""
    p = Path(os.path.realpath(os.fspath(path)))
    if not p.is_dir():
        if p.exists():
            resolve_regular(p, missing=ModelMissing, not_regular=ModelCorrupt)  # names what it is
        raise ModelMissing(f"Omni checkpoint directory not found: {path}", path=str(path))
    _check_regular_files(p)
    try:
        raw = read_regular(
            p / "config.json", 16 * MB, too_large=ModelCorrupt, missing=ModelMissing, not_regular=ModelCorrupt
        )
        config = json.loads(raw)
    except ModelMissing as err:
        raise ModelMissing(f"{path} has no config.json", path=str(p / "config.json")) from err
    except ValueError as err:
        raise ModelCorrupt(f"cannot parse {p / 'config.json'}: {err}", path=str(p / "config.json")) from err
    if not isinstance(config, dict) or config.get("model_type") != OMNI_MODEL_TYPE:
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise ModelCorrupt(f"{path} is a {kind!r} checkpoint, not {OMNI_MODEL_TYPE}", path=str(path))
    if not (p / "spk_dict.pt").is_file():
        raise ModelMissing(f"{path} has no spk_dict.pt (speaker voices)", path=str(p / "spk_dict.pt"))
    if not (p / "tokenizer_config.json").is_file() and not (p / "tokenizer.json").is_file():
        raise ModelMissing(f"{path} has no tokenizer files", path=str(path))
    counts = _count_safetensors_params(p)
    return OmniInfo(
        path=str(path),
        parameters=sum(counts.values()),
        thinker_parameters=counts.get("thinker", sum(counts.values())),
        voices=("Chelsie", "Ethan"),
    )


def variant_advice(size_bytes: int) -> str:
    """Name the closest published variant for a GGUF size (used in the config flow)."""
    size_mb = size_bytes / MB
    best = min(
        ((abs(mb - size_mb), f"{model} {quant}") for model, sizes in VARIANTS.items() for quant, mb in sizes.items()),
        key=lambda item: item[0],
    )
    return best[1] if best[0] < 0.1 * size_mb else "custom"
