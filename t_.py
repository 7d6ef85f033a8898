import ctypes, io, wave, numpy as np
from pathlib import Path
import llama_cpp
import llama_cpp.mtmd_cpp as m
from devtools.tiny_gguf import write_tiny_gguf
from devtools.media import make_jpeg, make_speech_wav
write_tiny_gguf(Path("/tmp/g64.gguf"))
llm = llama_cpp.Llama(model_path="/tmp/g64.gguf", n_ctx=4096, verbose=False)
p = m.mtmd_context_params_default()
p.use_gpu = False; p.print_timings = False; p.n_threads = 2
ctx = m.mtmd_init_from_file(b"/opt/sarai/src/mmproj-tiny.gguf", llm.model, p)
print("ctx", bool(ctx), m.mtmd_support_vision(ctx), m.mtmd_support_audio(ctx), m.mtmd_get_audio_sample_rate(ctx) if hasattr(m,'mtmd_get_audio_sample_rate') else None)
for name, data in (("img", make_jpeg((64, 48))), ("wav", make_speech_wav())):
    buf = (ctypes.c_ubyte * len(data)).from_buffer_copy(data)
    bmp = m.mtmd_helper_bitmap_init_from_buf(ctx, buf, len(data), False)
    print(name, "bitmap", bool(bmp), m.mtmd_bitmap_is_audio(bmp))
    chunks = m.mtmd_input_chunks_init()
    marker = m.mtmd_default_marker()
    text = m.mtmd_input_text()
    prompt = ("<|im_start|>user\n" + marker.decode() + "describe<|im_end|>\n<|im_start|>assistant\n").encode()
    text.text = prompt; text.text_len = len(prompt); text.add_special = False; text.parse_special = True
    arr = (m.mtmd_bitmap_p_ctypes * 1)(bmp)
    rc = m.mtmd_tokenize(ctx, chunks, ctypes.byref(text), arr, 1)
    print("tokenize rc", rc, "n_tokens", m.mtmd_helper_get_n_tokens(chunks), "n_pos", m.mtmd_helper_get_n_pos(chunks))
    new_past = llama_cpp.llama_pos(0)
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
    rc = m.mtmd_helper_eval_chunks(ctx, llm._ctx.ctx, chunks, 0, 0, llm.n_batch, True, ctypes.byref(new_past))
    print("eval rc", rc, "n_past", new_past.value)
    m.mtmd_input_chunks_free(chunks); m.mtmd_bitmap_free(bmp)
m.mtmd_free(ctx)

