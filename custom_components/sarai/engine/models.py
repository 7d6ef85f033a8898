"""Inspect model files without loading them: GGUF headers, Omni checkpoints, size estimates."""

from __future__ import annotations

from dataclasses import dataclass
import json
import os
from pathlib import Path
import struct
from typing import Any, BinaryIO

from .errors import ModelCorrupt, ModelMissing

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


def _read(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise ModelCorrupt("truncated GGUF header", path=getattr(fh, "name", "?"))
    return data


def _read_string(fh: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", _read(fh, 8))
    if length > _MAX_STRING:
        raise ModelCorrupt("implausible string length in GGUF header", path=getattr(fh, "name", "?"))
    return _read(fh, length).decode("utf-8", errors="replace")


def _read_value(fh: BinaryIO, vtype: int) -> Any:
    """Read one metadata value; arrays are skipped (returned as None)."""
    if vtype in _SCALAR:
        fmt = _SCALAR[vtype]
        return struct.unpack(fmt, _read(fh, struct.calcsize(fmt)))[0]
    if vtype == _STRING:
        return _read_string(fh)
    if vtype == _ARRAY:
        (itype,) = struct.unpack("<I", _read(fh, 4))
        (count,) = struct.unpack("<Q", _read(fh, 8))
        if itype in _SCALAR:
            fh.seek(count * struct.calcsize(_SCALAR[itype]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _read_value(fh, itype)
        return None
    raise ModelCorrupt(f"unknown GGUF value type {vtype}", path=getattr(fh, "name", "?"))


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Return the scalar metadata of a GGUF file (arrays are skipped)."""
    p = Path(path)
    if not p.is_file():
        raise ModelMissing(f"model file not found: {p}", path=str(p))
    try:
        fh = p.open("rb")
    except OSError as err:
        raise ModelMissing(f"cannot read {p}: {err}", path=str(p)) from err
    with fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ModelCorrupt(f"{p} is not a GGUF file", path=str(p))
        version, _n_tensors, n_kv = struct.unpack("<IQQ", _read(fh, 20))
        if version not in (2, 3):
            raise ModelCorrupt(f"unsupported GGUF version {version}", path=str(p))
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _read_string(fh)
            (vtype,) = struct.unpack("<I", _read(fh, 4))
            value = _read_value(fh, vtype)
            if value is not None:
                meta[key] = value
    return meta


def inspect_gguf(path: str | Path, allowed: tuple[str, ...] = TEXT_ARCHITECTURES) -> GGUFInfo:
    """Validate a GGUF file: readable, GGUF magic, an allowed architecture."""
    meta = read_gguf_metadata(path)
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
        size_bytes=Path(path).stat().st_size,
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
    """Validate an mmproj GGUF; with ``text``, check that it projects into that model's width."""
    meta = read_gguf_metadata(path)
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
        size_bytes=Path(path).stat().st_size,
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


def _count_safetensors_params(directory: Path) -> dict[str, int]:
    """Count parameters per top-level module from safetensors headers, without loading."""
    counts: dict[str, int] = {}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelMissing(f"no safetensors weights in {directory}", path=str(directory))
    for file in files:
        try:
            with file.open("rb") as fh:
                (header_len,) = struct.unpack("<Q", _read(fh, 8))
                if header_len > 256 * MB:
                    raise ModelCorrupt(f"bad safetensors header in {file}", path=str(file))
                header = json.loads(_read(fh, header_len))
        except (OSError, ValueError) as err:
            raise ModelCorrupt(f"cannot read {file}: {err}", path=str(file)) from err
        data_end = max((int(s["data_offsets"][1]) for k, s in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + data_end > file.stat().st_size:
            raise ModelCorrupt(f"{file.name} is truncated", path=str(file))
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            n = 1
            for dim in spec.get("shape", []):
                n *= int(dim)
            top = name.split(".", 1)[0]
            counts[top] = counts.get(top, 0) + n
    return counts


def inspect_omni(path: str | Path) -> OmniInfo:
    """Validate a Qwen2.5-Omni checkpoint directory without loading it."""
    p = Path(path)
    if not p.is_dir():
        raise ModelMissing(f"Omni checkpoint directory not found: {p}", path=str(p))
    try:
        config = json.loads((p / "config.json").read_text())
    except FileNotFoundError as err:
        raise ModelMissing(f"{p} has no config.json", path=str(p)) from err
    except (OSError, ValueError) as err:
        raise ModelCorrupt(f"cannot read {p / 'config.json'}: {err}", path=str(p)) from err
    if config.get("model_type") != OMNI_MODEL_TYPE:
        raise ModelCorrupt(f"{p} is a {config.get('model_type')!r} checkpoint, not {OMNI_MODEL_TYPE}", path=str(p))
    if not (p / "spk_dict.pt").is_file():
        raise ModelMissing(f"{p} has no spk_dict.pt (speaker voices)", path=str(p / "spk_dict.pt"))
    if not (p / "tokenizer_config.json").is_file() and not (p / "tokenizer.json").is_file():
        raise ModelMissing(f"{p} has no tokenizer files", path=str(p))
    counts = _count_safetensors_params(p)
    return OmniInfo(
        path=str(p),
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
