"""Hearing, seeing, speaking and time-aligned video on a transformers Qwen2.5-Omni checkpoint."""

from __future__ import annotations

import io
import logging
import math
import threading
from typing import Any
import warnings

import numpy as np

from .errors import InvalidInput, ModelCorrupt
from .manager import Backend
from .models import OmniInfo, inspect_omni
from .text import neutralize_special, sanitize_text

_LOGGER = logging.getLogger(__name__)

SPEECH_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
    "perceiving auditory and visual inputs, as well as generating text and speech."
)
# Resident cost of torch + transformers, paid once per process by the first Omni load, measured on the
# development machine (x86-64, torch 2.15.0, transformers 5.24): importing them and the Qwen2.5-Omni classes
# grew RSS by 930 MB, loading the tiny checkpoint and hearing once by 133 MB more. See README "Memory".
FRAMEWORK_BYTES = 1024 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # decompression-bomb guard, on the decoded (JPEG: draft-reduced) size
MAX_IMAGE_BYTES = 20 * 1024 * 1024
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
# What reaches a processor or libmtmd: both Qwen2-VL's image processor (28 px factor, aspect < 200,
# min/max pixels) and llama.cpp's mtmd accept these bounds in any orientation.
PATCH = 28
MODEL_MAX_PIXELS = PATCH * PATCH * 1280  # Qwen2-VL's default max_pixels (1280 merged patches)
MODEL_MIN_SIDE = 2 * PATCH  # Qwen2-VL's default min_pixels is 56 x 56
MAX_ASPECT = 50  # longer side / shorter side; more extreme images are letterboxed


def fit_size(width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(canvas size, content size) that brings an image inside the model limits, or None when it already is.

    The canvas keeps the content's aspect when it can: an aspect beyond 1:``MAX_ASPECT`` is padded
    (letterboxed) on the short side, more than ``MODEL_MAX_PIXELS`` is scaled down, a side under
    ``MODEL_MIN_SIDE`` is scaled up; the canvas sides are multiples of the 28 px patch.
    """
    width, height = max(1, width), max(1, height)
    if (
        max(width, height) <= MAX_ASPECT * min(width, height)
        and width * height <= MODEL_MAX_PIXELS
        and min(width, height) >= MODEL_MIN_SIDE
    ):
        return None
    cw, ch = float(width), float(height)
    if cw > MAX_ASPECT * ch:
        ch = cw / MAX_ASPECT
    elif ch > MAX_ASPECT * cw:
        cw = ch / MAX_ASPECT
    scale = min(1.0, math.sqrt(MODEL_MAX_PIXELS / (cw * ch)))
    if min(cw, ch) * scale < MODEL_MIN_SIDE:
        scale = MODEL_MIN_SIDE / min(cw, ch)
    canvas_w = max(MODEL_MIN_SIDE, int(cw * scale) // PATCH * PATCH)
    canvas_h = max(MODEL_MIN_SIDE, int(ch * scale) // PATCH * PATCH)
    canvas_w, canvas_h = min(canvas_w, MAX_ASPECT * canvas_h), min(canvas_h, MAX_ASPECT * canvas_w)
    content = (
        min(canvas_w, max(1, round(width * canvas_w / cw))),
        min(canvas_h, max(1, round(height * canvas_h / ch))),
    )
    return (canvas_w, canvas_h), content


def fit_image(img: Any) -> Any:
    """An RGB image inside the model limits (``fit_size``): letterboxed, scaled down or up as needed."""
    from PIL import Image

    fit = fit_size(img.width, img.height)
    if fit is None:
        return img
    canvas_size, content_size = fit
    _LOGGER.debug("Image of %dx%d fitted into %dx%d", img.width, img.height, *canvas_size)
    content = img.resize(content_size, Image.Resampling.BICUBIC)
    if content_size == canvas_size:
        return content
    canvas = Image.new("RGB", canvas_size)
    canvas.paste(content, ((canvas_size[0] - content_size[0]) // 2, (canvas_size[1] - content_size[1]) // 2))
    return canvas


def load_image(data: bytes) -> Any:
    """Decode JPEG/PNG/WebP/GIF/BMP bytes safely into an RGB PIL image inside the model limits.

    Upright by its EXIF orientation; a huge JPEG is decoded reduced (libjpeg's DCT scaling); more
    than ``MAX_IMAGE_PIXELS`` decoded is refused before decoding; anything unreadable is
    ``InvalidInput`` with the ``image_invalid`` key (the decoder's text stays in the debug log).
    """
    from PIL import Image, ImageOps

    if not data:
        raise InvalidInput("the image is empty", key="image_invalid")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidInput(
            f"the image has {len(data)} bytes", key="image_bytes_too_large", max_mb=MAX_IMAGE_BYTES // (1024 * 1024)
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.format not in IMAGE_FORMATS:
                    raise InvalidInput(f"unsupported image format {img.format}", key="image_format", format=img.format)
                width, height = img.size
                if img.format == "JPEG" and width * height > MODEL_MAX_PIXELS:
                    scale = math.sqrt(MODEL_MAX_PIXELS / (width * height))
                    img.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise InvalidInput(
                        f"image of {width}x{height} pixels is too large",
                        key="image_too_large",
                        width=width,
                        height=height,
                        max_mp=MAX_IMAGE_PIXELS // 1_000_000,
                    )
                img.load()
                rgb = (ImageOps.exif_transpose(img) or img).convert("RGB")
    except InvalidInput:
        raise
    except Exception as err:
        raise InvalidInput(f"not a usable image: {type(err).__name__}: {err}", key="image_invalid") from err
    return fit_image(rgb)


def talker_budget(text: str, cap: int = 600) -> int:
    """Codec tokens the talker may produce for ``text``: generous for normal speech, bounded by the text's length.

    Speech runs at ~15 characters per second in alphabetic languages and ~4 per second in CJK scripts; the
    talker emits ~50 codec tokens per second of speech, so ~4 tokens per character (13 per CJK character),
    doubled for slow speakers and pauses, plus a short lead-in.
    """
    cjk = sum(1 for c in text if "\u3040" <= c <= "\u9fff" or "\uac00" <= c <= "\ud7af")
    return min(cap, max(16, 24 + 8 * (len(text) - cjk) + 26 * cjk))


def transcribe_prompt(language: str) -> str:
    """The instruction that turns Omni into a speech recogniser."""
    return f"Transcribe this audio exactly, in its language ({language}). Output only the transcript."


class OmniBackend(Backend):
    """The full Qwen2.5-Omni model (thinker + talker + token2wav) in transformers."""

    kind = "transformers"

    def __init__(self, name: str, path: str, dtype: str = "auto", quantize_int8: bool = False) -> None:
        """Validate the directory now; load later."""
        super().__init__(name)
        self.info: OmniInfo = inspect_omni(path)
        self.dtype = dtype
        self.quantize_int8 = quantize_int8
        self._model: Any = None
        self._processor: Any = None

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory."""
        return self._model is not None

    def _dtype_bytes(self) -> float:
        if self.quantize_int8:
            return 1.0
        return 4.0 if self.dtype == "float32" else 2.0

    def estimate_bytes(self) -> int:
        """Parameters (from safetensors headers) x dtype bytes, with the talker; the first load also brings in
        torch and transformers (``FRAMEWORK_BYTES``), which then stay resident."""
        weights = self.info.estimate_bytes(self._dtype_bytes(), with_talker=True) + 16 * 1024 * 1024
        return weights + (0 if self.loads else FRAMEWORK_BYTES)

    def framework_bytes(self) -> int:
        """torch + transformers stay in the process once loaded."""
        return FRAMEWORK_BYTES

    def load(self) -> None:
        """Load model and processor from the local directory (never a hub)."""
        import torch
        from transformers import (
            Qwen2_5OmniForConditionalGeneration,
            Qwen2_5OmniProcessor,
        )

        inspect_omni(self.info.path)
        gpu = torch.cuda.is_available()
        dtype: Any
        if self.dtype == "auto":
            dtype = torch.bfloat16 if gpu else torch.float32
        else:
            dtype = getattr(torch, self.dtype)
        try:
            model = Qwen2_5OmniForConditionalGeneration.from_pretrained(  # type: ignore[no-untyped-call]
                self.info.path, dtype=dtype, local_files_only=True
            )
            processor = Qwen2_5OmniProcessor.from_pretrained(self.info.path, local_files_only=True)
        except Exception as err:
            raise ModelCorrupt(f"transformers cannot load {self.info.path}: {err}", path=self.info.path) from err
        if gpu:  # pragma: no cover - the test machines have no GPU
            model = model.to("cuda")
        elif self.quantize_int8:
            model.thinker = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
                model.thinker, {torch.nn.Linear}, dtype=torch.qint8
            )
        model.eval()
        self._model, self._processor = model, processor

    def unload(self) -> None:
        """Drop the model (and the CUDA cache when present)."""
        self._model = self._processor = None
        import gc

        gc.collect()

    # -- helpers -----------------------------------------------------------------------

    def _stopping(self, stop: threading.Event) -> Any:
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Stop(StoppingCriteria):  # type: ignore[misc]
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                import torch

                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool)

        return StoppingCriteriaList([_Stop()])

    def _inputs(self, content: list[dict[str, Any]], system: str | None = None, **media: Any) -> Any:
        """The processor's inputs. transformers' tokenizers parse special tokens anywhere in the text, so the
        text parts are neutralised first (``neutralize_special``): only the chat template writes control tokens."""
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": neutralize_special(system)}]})
        content = [
            {**part, "text": neutralize_special(part["text"])} if part.get("type") == "text" else part
            for part in content
        ]
        messages.append({"role": "user", "content": content})
        text = self._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self._processor(text=text, return_tensors="pt", padding=True, **media)
        return inputs.to(self._model.device)

    def _generate_text(self, inputs: Any, max_new_tokens: int, stop: threading.Event, **kwargs: Any) -> str:
        import torch

        with torch.inference_mode():
            out = self._model.thinker.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                stopping_criteria=self._stopping(stop),
                **kwargs,
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        return sanitize_text(str(self._processor.batch_decode(new, skip_special_tokens=True)[0])).strip()

    # -- modalities --------------------------------------------------------------------

    def transcribe(self, audio_16k: np.ndarray, language: str, stop: threading.Event, max_new_tokens: int = 128) -> str:
        """Speech -> text for one <= 30 s window."""
        prompt = transcribe_prompt(language)
        inputs = self._inputs(
            [{"type": "audio", "audio": "input"}, {"type": "text", "text": prompt}], audio=[audio_16k]
        )
        return self._generate_text(inputs, max_new_tokens, stop)

    def describe_image(self, image: Any, prompt: str, stop: threading.Event, max_new_tokens: int = 128) -> str:
        """Image + question -> text."""
        inputs = self._inputs([{"type": "image", "image": "input"}, {"type": "text", "text": prompt}], images=[image])
        return self._generate_text(inputs, max_new_tokens, stop)

    def describe_video(
        self,
        frames: np.ndarray,
        fps: float,
        audio_16k: np.ndarray | None,
        prompt: str,
        stop: threading.Event,
        max_new_tokens: int = 256,
    ) -> str:
        """Frames (T, H, W, 3 uint8) + optional audio track, TMRoPE-aligned -> text."""
        content = [{"type": "video", "video": "input"}, {"type": "text", "text": prompt}]
        video = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))
        media: dict[str, Any] = {"videos": [video], "videos_kwargs": {"fps": float(fps)}}
        kwargs: dict[str, Any] = {}
        if audio_16k is not None and audio_16k.size:
            media.update(audio=[audio_16k], load_audio_from_video=True, audio_from_video_indices=[0])
            kwargs["use_audio_in_video"] = True
        inputs = self._inputs(content, **media)
        self.last_video_inputs = {k: tuple(v.shape) for k, v in inputs.items() if hasattr(v, "shape")}
        return self._generate_text(inputs, max_new_tokens, stop, **kwargs)

    def speak(self, text: str, voice: str, stop: threading.Event, max_codec_tokens: int = 600) -> np.ndarray:
        """Text -> 24 kHz mono float32 speech with the talker (the official system prompt is required).

        The talker's output is capped in proportion to the text (``talker_budget``): a talker that never says
        it is done cannot run far past what the sentence needs.
        """
        import torch

        if stop.is_set():
            return np.zeros(0, dtype=np.float32)
        inputs = self._inputs(
            [{"type": "text", "text": f"Say exactly this and nothing else: {text}"}], system=SPEECH_SYSTEM_PROMPT
        )
        talker_cfg = self._model.config.talker_config
        try:
            with torch.inference_mode():
                result = self._model.generate(
                    **inputs,
                    speaker=voice,
                    thinker_max_new_tokens=max(16, len(text)),
                    talker_max_new_tokens=talker_budget(text, max_codec_tokens),
                    talker_eos_token_id=talker_cfg.tts_codec_end_token_id,
                    do_sample=False,
                )
        except (RuntimeError, ValueError) as err:
            # The talker can end before its first speech code (token2wav then has nothing to
            # shape): that sentence is silent, the rest of the answer still speaks.
            if "0 elements" not in str(err):
                raise ModelCorrupt(f"speech generation failed: {err}", path=self.info.path) from err
            _LOGGER.warning("The talker produced no speech for %r", text[:60])
            return np.zeros(0, dtype=np.float32)
        if stop.is_set():
            return np.zeros(0, dtype=np.float32)
        wav = result[1] if isinstance(result, tuple) else None
        if wav is None:
            return np.zeros(0, dtype=np.float32)
        return np.asarray(wav.reshape(-1).float().cpu().numpy(), dtype=np.float32)
