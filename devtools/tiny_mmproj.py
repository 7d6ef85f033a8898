"""Write the mmproj GGUF (audio + vision encoders, projector ``qwen2.5o``) of a tiny Qwen2.5-Omni checkpoint.

Does what llama.cpp's ``convert_hf_to_gguf.py --mmproj`` does for ``Qwen2_5OmniModel`` (checked
tensor by tensor against its output for the tiny checkpoint), with the ``gguf`` package only, so that
tests and ``scripts/develop`` can build an mmproj that libmtmd loads without llama.cpp's sources.

``text_hidden`` makes it fit another text model: the two output projections (the vision merger's last
layer and the audio tower's ``proj``) are replaced by seeded random ones of that width, so the encoders
project into that model's embeddings (576 for SmolLM2-135M, see ``devtools.smollm2.smollm2_mmproj``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _state_dict(omni_dir: Path) -> dict[str, Any]:
    from safetensors.numpy import load_file

    tensors: dict[str, Any] = {}
    for file in sorted(omni_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _audio_positions(channels: int, length: int = 1500) -> np.ndarray:
    """Whisper's sinusoidal position embedding (the checkpoint does not store it)."""
    log_inc = np.log(10000) / (channels // 2 - 1)
    inv = np.exp(-log_inc * np.arange(channels // 2, dtype=np.float32))
    scaled = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


# The tensors whose rows are the text model's embedding width: what ``text_hidden`` replaces.
OUTPUT_PROJECTIONS = ("visual.merger.mlp.2.", "audio_tower.proj.")


def _reproject(tensors: dict[str, Any], width: int, seed: int) -> dict[str, Any]:
    """``tensors`` with each output projection redrawn to ``width`` rows (same columns, same spread)."""
    rng = np.random.default_rng(seed)
    out = dict(tensors)
    for full_name in sorted(tensors):
        name = full_name.removeprefix("thinker.")
        if not name.startswith(OUTPUT_PROJECTIONS):
            continue
        data = np.asarray(tensors[full_name], dtype=np.float32)
        scale = float(data.std()) or 0.02
        out[full_name] = (rng.standard_normal((width, *data.shape[1:])) * scale).astype(np.float32)
    return out


def write_tiny_mmproj(
    omni_dir: Path, out: Path, projector: str = "qwen2.5o", text_hidden: int | None = None, seed: int = 0
) -> Path:
    """Convert ``omni_dir``'s thinker audio and vision towers into an mmproj GGUF at ``out``.

    ``text_hidden``: the embedding width of the text model it is for (default: the checkpoint's own);
    another width redraws the output projections at random (``seed``), the encoders stay the checkpoint's.
    """
    import gguf

    config = json.loads((omni_dir / "config.json").read_text())
    thinker = config["thinker_config"]
    vision, audio = thinker["vision_config"], thinker["audio_config"]
    own_hidden = int(thinker["text_config"]["hidden_size"])
    text_hidden = own_hidden if text_hidden is None else int(text_hidden)
    state = _state_dict(omni_dir)
    if text_hidden != own_hidden:
        state = _reproject(state, text_hidden, seed)
    pre = (
        json.loads((omni_dir / "preprocessor_config.json").read_text())
        if (omni_dir / "preprocessor_config.json").exists()
        else {}
    )
    full = vision["fullatt_block_indexes"]
    n_blocks = max(int(vision["depth"]), int(audio["encoder_layers"]), 3)  # audio_tower.conv{1,2} use block ids
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, n_blocks)

    writer = gguf.GGUFWriter(str(out), "clip")
    writer.add_type("mmproj")
    writer.add_name("Tiny Omni")
    writer.add_file_type(0)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_uint32("clip.vision.projection_dim", text_hidden)
    writer.add_uint32("clip.vision.image_size", 560)
    writer.add_uint32("clip.vision.patch_size", int(vision["patch_size"]))
    writer.add_uint32("clip.vision.embedding_length", int(vision["hidden_size"]))
    writer.add_uint32("clip.vision.feed_forward_length", int(vision["intermediate_size"]))
    writer.add_uint32("clip.vision.block_count", int(vision["depth"]))
    writer.add_uint32("clip.vision.attention.head_count", int(vision["num_heads"]))
    mean = pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073])
    std = pre.get("image_std", [0.26862954, 0.26130258, 0.27577711])
    writer.add_array("clip.vision.image_mean", [float(x) for x in mean])
    writer.add_array("clip.vision.image_std", [float(x) for x in std])
    writer.add_bool("clip.has_audio_encoder", True)
    writer.add_uint32("clip.audio.projection_dim", text_hidden)
    writer.add_uint32("clip.audio.embedding_length", int(audio["d_model"]))
    writer.add_uint32("clip.audio.feed_forward_length", int(audio["encoder_ffn_dim"]))
    writer.add_uint32("clip.audio.block_count", int(audio["encoder_layers"]))
    writer.add_uint32("clip.audio.attention.head_count", int(audio["encoder_attention_heads"]))
    writer.add_uint32("clip.audio.num_mel_bins", int(audio["num_mel_bins"]))
    writer.add_float32("clip.audio.attention.layer_norm_epsilon", float(audio.get("layer_norm_eps", 1e-5)))
    writer.add_string("clip.projector_type", projector)
    writer.add_bool("clip.use_silu", True)
    writer.add_uint32("clip.vision.n_wa_pattern", int(full[0]) + 1)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", float(config.get("rms_norm_eps", 1e-6)))
    writer.add_quantization_version(2)

    def add(hf_name: str, data: np.ndarray) -> None:
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        if ".conv" in hf_name and hf_name.endswith(".weight"):
            data = data.astype(np.float16)
        else:
            data = data.astype(np.float32)
        writer.add_tensor(new, np.ascontiguousarray(data))

    writer.add_tensor("a.position_embd.weight", _audio_positions(int(audio["d_model"])))
    for full_name, data in state.items():
        name = full_name.removeprefix("thinker.")
        if not name.startswith(("visual.", "audio_tower.")) or "audio_bos_eos_token" in name:
            continue
        data = np.asarray(data)
        if ".qkv." in name:
            c = data.shape[0] // 3
            for i, part in enumerate(("q", "k", "v")):
                add(name.replace("qkv", part), data[i * c : (i + 1) * c])
        elif "patch_embed.proj.weight" in name:
            patch = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_ENC_EMBD_PATCH]
            writer.add_tensor(f"{patch}.weight", np.ascontiguousarray(data[:, :, 0].astype(np.float32)))
            writer.add_tensor(f"{patch}.weight.1", np.ascontiguousarray(data[:, :, 1].astype(np.float32)))
        elif "conv1.bias" in name or "conv2.bias" in name:
            add(name, data[:, None])
        else:
            add(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
