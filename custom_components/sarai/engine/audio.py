"""Audio helpers: WAV/PCM at any rate in, 16 kHz mono float out; float out, 16-bit WAV bytes."""

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
    """Band-limited resampling of mono float32 audio (libswresample through PyAV), any rate to any rate."""
    if rate <= 0 or target <= 0:
        raise InvalidInput(f"impossible sample rate {rate} -> {target}", key="audio_invalid")
    data = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
    if rate == target or data.size == 0:
        return data
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=int(target))
    frame = av.AudioFrame.from_ndarray(data.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = int(rate)
    frame.pts = 0
    parts = [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
    parts += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    out: np.ndarray = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    n_out = int(round(data.size * target / rate))
    if out.size < n_out:
        out = np.concatenate([out, np.zeros(n_out - out.size, np.float32)])
    return out[:n_out]


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Decode a PCM WAV file into mono float32 samples and its rate."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            if wav.getsampwidth() != 2:
                raise InvalidInput(
                    f"{8 * wav.getsampwidth()}-bit WAV: only 16-bit PCM is supported", key="audio_invalid"
                )
            rate = wav.getframerate()
            channels = wav.getnchannels()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as err:
        raise InvalidInput(f"not a PCM WAV file: {err}", key="audio_invalid") from err
    if rate <= 0 or channels <= 0:
        raise InvalidInput(f"WAV header with rate {rate} and {channels} channels", key="audio_invalid")
    return pcm16_to_float(frames, channels), rate


def to_hearing_input(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mono float32 at 16 kHz; raises on empty audio."""
    if samples.size == 0:
        raise InvalidInput("the audio is empty", key="audio_empty")
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


def wav_stream_header(rate: int = SPEAK_RATE) -> bytes:
    """A 16-bit mono WAV header with an open length: PCM follows as it is made (streamed speech)."""
    header = bytearray(wav_bytes(b"", rate))
    header[4:8] = (0xFFFFFFFF).to_bytes(4, "little")
    header[40:44] = (0xFFFFFFFF - 36).to_bytes(4, "little")
    return bytes(header)
