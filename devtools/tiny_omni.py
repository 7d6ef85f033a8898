"""Build a tiny random Qwen2.5-Omni checkpoint (thinker + talker + token2wav) and its processor.

Saved with ``save_pretrained`` so that SARAi loads it through the same code as the real
``Qwen/Qwen2.5-Omni-7B`` directory: config.json, safetensors weights, processor files and
``spk_dict.pt`` (voices Chelsie and Ethan).
"""

from __future__ import annotations

from pathlib import Path

from .tiny_gguf import MERGES, bytes_to_unicode

OMNI_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|vision_pad|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<tool_call>",
    "</tool_call>",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}{{ '<|vision_bos|><|IMAGE|><|vision_eos|>' }}"
    "{% elif content['type'] == 'audio' or 'audio' in content %}{{ '<|audio_bos|><|AUDIO|><|audio_eos|>' }}"
    "{% elif content['type'] == 'video' or 'video' in content %}{{ '<|vision_bos|><|VIDEO|><|vision_eos|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _write_tokenizer(out: Path) -> dict[str, int]:
    from transformers import Qwen2Tokenizer

    vocab: dict[str, int] = {}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    for merge in MERGES:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in MERGES],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|IMAGE|>",
            "audio_token": "<|AUDIO|>",
            "video_token": "<|VIDEO|>",
            "vision_bos_token": "<|vision_bos|>",
            "vision_eos_token": "<|vision_eos|>",
            "audio_bos_token": "<|audio_bos|>",
            "audio_eos_token": "<|audio_eos|>",
        },
    )
    tok.add_special_tokens({"additional_special_tokens": OMNI_SPECIAL})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return {t: tok.convert_tokens_to_ids(t) for t in OMNI_SPECIAL}


def write_tiny_omni(out: Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen2.5-Omni checkpoint directory at ``out``."""
    import torch
    from transformers import (
        Qwen2_5OmniConfig,
        Qwen2_5OmniForConditionalGeneration,
        Qwen2_5OmniProcessor,
        Qwen2TokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    out.mkdir(parents=True, exist_ok=True)
    ids = _write_tokenizer(out)
    n_vocab = max(ids.values()) + 1
    text_vocab = ((n_vocab + 63) // 64) * 64
    hidden = 64
    heads = 4
    mrope = [2, 3, 3]  # sums to head_dim / 2 = 8
    thinker = {
        "audio_config": {
            "num_mel_bins": 128,
            "encoder_layers": 1,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "d_model": 32,
            "output_dim": hidden,
            "n_window": 100,
            "max_source_positions": 1500,
        },
        "vision_config": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [1],
            "window_size": 112,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "text_config": {
            "vocab_size": text_vocab,
            "hidden_size": hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        },
        "audio_token_index": ids["<|AUDIO|>"],
        "image_token_index": ids["<|IMAGE|>"],
        "video_token_index": ids["<|VIDEO|>"],
        "audio_start_token_id": ids["<|audio_bos|>"],
        "audio_end_token_id": ids["<|audio_eos|>"],
        "vision_start_token_id": ids["<|vision_bos|>"],
        "vision_end_token_id": ids["<|vision_eos|>"],
        "user_token_id": 0,
        "position_id_per_seconds": 25,
        "seconds_per_chunk": 2,
    }
    codec_vocab = 64
    talker = {
        "vocab_size": codec_vocab,
        "embedding_size": hidden,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        "tts_text_start_token_id": ids["<|box_end|>"],
        "tts_text_end_token_id": ids["<|quad_start|>"],
        "tts_text_pad_token_id": ids["<|quad_end|>"],
        "tts_codec_start_token_id": codec_vocab - 4,
        "tts_codec_end_token_id": codec_vocab - 3,
        "tts_codec_pad_token_id": codec_vocab - 5,
        "tts_codec_mask_token_id": codec_vocab - 2,
        "audio_token_index": ids["<|AUDIO|>"],
        "image_token_index": ids["<|IMAGE|>"],
        "video_token_index": ids["<|VIDEO|>"],
        "audio_start_token_id": ids["<|audio_bos|>"],
        "audio_end_token_id": ids["<|audio_eos|>"],
        "vision_start_token_id": ids["<|vision_bos|>"],
        "vision_end_token_id": ids["<|vision_eos|>"],
    }
    token2wav = {
        "dit_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "ff_mult": 2,
            "emb_dim": 16,
            "head_dim": 16,
            "block_size": 4,
            "look_ahead_layers": [1],
            "look_backward_layers": [0],
            "repeats": 2,
            "num_embeds": codec_vocab,
            "mel_dim": 80,
            "enc_emb_dim": 16,
            "enc_dim": 16,
            "enc_channels": [16, 16, 16, 16, 48],
            "enc_kernel_sizes": [5, 3, 3, 3, 1],
            "enc_dilations": [1, 2, 3, 4, 1],
            "enc_attention_channels": 8,
            "enc_se_channels": 8,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "bigvgan_config": {
            "mel_dim": 80,
            "upsample_initial_channel": 64,
            "resblock_kernel_sizes": [3],
            "resblock_dilation_sizes": [[1, 3, 5]],
            "upsample_rates": [5, 3, 2, 2, 2, 2],
            "upsample_kernel_sizes": [11, 7, 4, 4, 4, 4],
        },
    }
    config = Qwen2_5OmniConfig(
        thinker_config=thinker, talker_config=talker, token2wav_config=token2wav, enable_audio_output=True
    )
    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(config)
    with torch.no_grad():
        # Like the tiny GGUF: special tokens (EOS included) and unused rows never win greedy decoding,
        # so the random thinker always says something (bounded by max_new_tokens).
        first_special = min(ids.values())
        head = model.thinker.lm_head.weight
        head[first_special:] = 0.0
        letters = head[64:90].clone()  # byte-level ids 64..89 are "a".."z"
        head[:first_special] *= 0.05
        head[64:90] = letters
    model.save_pretrained(out)
    spk = {
        name: {
            "cond": torch.randn(1, 16) if False else torch.randn(16),
            "ref_mel": torch.randn(1, 30, 80),
            "bos_token": codec_vocab - 6 - i,
        }
        for i, name in enumerate(("Chelsie", "Ethan"))
    }
    torch.save(spk, out / "spk_dict.pt")
    tokenizer = Qwen2TokenizerFast.from_pretrained(out)
    processor = Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224),
        video_processor=Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out
