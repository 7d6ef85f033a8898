"""Hearing, seeing, speaking and time-aligned video on a transformers Qwen2.5-Omni checkpoint."""

from __future__ import annotations

import io
import logging
import threading
from typing import Any

import numpy as np

from .errors import InvalidInput, ModelCorrupt
from .manager import Backend
from .models import OmniInfo, inspect_omni

_LOGGER = logging.getLogger(__name__)

SPEECH_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
    "perceiving auditory and visual inputs, as well as generating text and speech."
)
MAX_IMAGE_PIXELS = 40_000_000  # decompression-bomb guard
MAX_IMAGE_BYTES = 20 * 1024 * 1024


def load_image(data: bytes) -> Any:
    """Decode JPEG/PNG/WebP bytes safely into an RGB PIL image."""
    from PIL import Image

    if not data:
        raise InvalidInput("the image is empty", reason="empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidInput("the image is larger than 20 MB", reason="too_large")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("JPEG", "PNG", "WEBP", "GIF", "BMP"):
                raise InvalidInput(f"unsupported image format {img.format}", reason="format")
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise InvalidInput(f"image of {img.width}x{img.height} pixels is too large", reason="too_large")
            img.load()
            return img.convert("RGB")
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as err:
        raise InvalidInput(f"not a usable image: {err}", reason="not_image") from err


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
        """Parameters (from safetensors headers) x dtype bytes, with the talker."""
        return self.info.estimate_bytes(self._dtype_bytes(), with_talker=True) + 16 * 1024 * 1024

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
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
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
        return str(self._processor.batch_decode(new, skip_special_tokens=True)[0]).strip()

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
        """Text -> 24 kHz mono float32 speech with the talker (the official system prompt is required)."""
        import torch

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
                    talker_max_new_tokens=max_codec_tokens,
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
