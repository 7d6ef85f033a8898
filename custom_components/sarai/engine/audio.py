"""Audio helpers: WAV/PCM in, 16 kHz mono float out; float out, 16-bit WAV bytes."""

from __future__ import annotations

import io
import wave

import numpy as np

from .errors import InvalidInput

HEAR_RATE = 16000
SPEAK_RATE = 24000
MAX_CHUNK_S = 30.0  # Omni silently truncates longer audio


def pcm16_to_float(pcm: bytes, channels: int = 1) -> np.ndarray:
    """Little-endian signed 16-bit PCM -> mono float32 in [-1, 1]."""
    if len(pcm) % (2 * channels):
        pcm = pcm[: len(pcm) - len(pcm) % (2 * channels)]
    data = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1)
    return data


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Linear-interpolation resampling (enough for speech recognition input)."""
    if rate == target or samples.size == 0:
        return np.asarray(samples, dtype=np.float32)
    n_out = int(round(samples.size * target / rate))
    x_old = np.arange(samples.size, dtype=np.float64) / rate
    x_new = np.arange(n_out, dtype=np.float64) / target
    out: np.ndarray = np.interp(x_new, x_old, samples).astype(np.float32)
    return out


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Decode a PCM WAV file into mono float32 samples and its rate."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            if wav.getsampwidth() != 2:
                raise InvalidInput("only 16-bit PCM WAV is supported", reason="sample_width")
            rate = wav.getframerate()
            channels = wav.getnchannels()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as err:
        raise InvalidInput(f"not a PCM WAV file: {err}", reason="not_wav") from err
    return pcm16_to_float(frames, channels), rate


def to_hearing_input(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mono float32 at 16 kHz; raises on empty audio."""
    if samples.size == 0:
        raise InvalidInput("the audio is empty", reason="empty")
    return resample(samples, rate, HEAR_RATE)


def chunks_30s(samples: np.ndarray) -> list[np.ndarray]:
    """Split 16 kHz audio into <= 30 s windows (Omni truncates silently beyond 30 s)."""
    step = int(MAX_CHUNK_S * HEAR_RATE)
    return [samples[i : i + step] for i in range(0, samples.size, step)] or [samples]


def float_to_pcm16(samples: np.ndarray) -> bytes:
    """float32 [-1, 1] -> little-endian 16-bit PCM bytes."""
    clipped = np.clip(samples, -1.0, 1.0)
    return (clipped * 32767.0).astype("<i2").tobytes()


def wav_bytes(pcm: bytes, rate: int = SPEAK_RATE, channels: int = 1) -> bytes:
    """Wrap 16-bit PCM in a WAV container."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm)
    return buf.getvalue()
