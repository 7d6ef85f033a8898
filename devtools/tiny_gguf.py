"""Write a tiny Qwen2-family GGUF with random weights, loadable by llama.cpp.

The vocabulary is GPT-2 byte-level BPE (every byte is a token, plus a few merges and the
Qwen/ChatML special tokens), so any text can be tokenised and detokenised.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|AUDIO|>",
]

MERGES = ["Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he", "e r", "Ġ s", "a t"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def vocabulary() -> tuple[list[str], list[int]]:
    """Tokens and token types: 256 byte tokens, merges, special tokens."""
    tokens = list(bytes_to_unicode().values())
    for merge in MERGES:
        tokens.append(merge.replace(" ", ""))
    types = [gguf.TokenType.NORMAL] * len(tokens)
    tokens += SPECIAL_TOKENS
    types += [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    return tokens, [int(t) for t in types]


def add_chatml_tokenizer(writer: gguf.GGUFWriter, tokens: list[str], types: list[int], merges: list[str]) -> None:
    """A Qwen-style BPE tokenizer and the ChatML template (<|endoftext|> as BOS/pad, <|im_end|> as EOS)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "qwen2vl",
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 32768,
    seed: int = 0,
    dtype: type[np.floating] = np.float32,
) -> Path:
    """Write a random-weight Qwen2/Qwen2-VL GGUF at ``path`` and return it."""
    rng = np.random.default_rng(seed)
    tokens, types = vocabulary()
    n_vocab = len(tokens)
    head_dim = n_embd // n_head
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"sarai-tiny-{arch}")
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    if arch == "qwen2vl":
        quarter = head_dim // 4
        writer.add_rope_dimension_sections([quarter, quarter, head_dim // 2 - 2 * quarter, 0])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16)
    add_chatml_tokenizer(writer, tokens, types, MERGES)

    def rand(*shape: int, scale: float = 0.05) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(dtype)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    kv = n_head_kv * head_dim
    writer.add_tensor("token_embd.weight", rand(n_vocab, n_embd, scale=0.5))
    writer.add_tensor("output_norm.weight", ones(n_embd))
    output = rand(n_vocab, n_embd, scale=0.5)
    # End-of-turn tokens get a zero logit (near the median of random logits), so greedy
    # decoding of this random model answers with its full max_tokens instead of stopping
    # at once: the tests then always see a non-empty answer.
    for special in ("<|im_end|>", "<|endoftext|>"):
        output[tokens.index(special)] = 0
    writer.add_tensor("output.weight", output)
    for i in range(n_layer):
        b = f"blk.{i}"
        writer.add_tensor(f"{b}.attn_norm.weight", ones(n_embd))
        writer.add_tensor(f"{b}.attn_q.weight", rand(n_embd, n_embd))
        writer.add_tensor(f"{b}.attn_q.bias", np.zeros(n_embd, dtype=np.float32))
        writer.add_tensor(f"{b}.attn_k.weight", rand(kv, n_embd))
        writer.add_tensor(f"{b}.attn_k.bias", np.zeros(kv, dtype=np.float32))
        writer.add_tensor(f"{b}.attn_v.weight", rand(kv, n_embd))
        writer.add_tensor(f"{b}.attn_v.bias", np.zeros(kv, dtype=np.float32))
        writer.add_tensor(f"{b}.attn_output.weight", rand(n_embd, n_embd))
        writer.add_tensor(f"{b}.ffn_norm.weight", ones(n_embd))
        writer.add_tensor(f"{b}.ffn_gate.weight", rand(n_ff, n_embd))
        writer.add_tensor(f"{b}.ffn_up.weight", rand(n_ff, n_embd))
        writer.add_tensor(f"{b}.ffn_down.weight", rand(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
