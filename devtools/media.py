"""Media fixtures made on the spot: an H.264 + AAC clip with a known event, a JPEG, a speech-like WAV."""

from __future__ import annotations

import io
from pathlib import Path
import shutil
import subprocess
import wave

import numpy as np


def make_clip(
    path: str | Path,
    seconds: float = 5.0,
    size: tuple[int, int] = (320, 240),
    fps: int = 25,
    shape_at: float = 2.0,
    tone_at: float = 3.0,
    audio: bool = True,
    video_codec: str = "libx264",
) -> Path:
    """Encode a clip: grey background, a white square from ``shape_at`` s, a 1 kHz burst at ``tone_at`` s."""
    import av

    path = Path(path)
    w, h = size
    with av.open(str(path), "w") as out:
        vs = out.add_stream(video_codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.options = {"preset": "ultrafast"} if video_codec == "libx264" else {}
        a_s = out.add_stream("aac", rate=16000, layout="mono") if audio else None
        n = int(seconds * fps)
        for i in range(n):
            t = i / fps
            img = np.full((h, w, 3), 60, np.uint8)
            if t >= shape_at:
                x = int((t - shape_at) * 40) % max(1, w - 60)
                img[h // 3 : h // 3 + 60, x : x + 60] = 255
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if a_s is not None:
            rate, chunk = 16000, 1024
            total = int(seconds * rate)
            sig = np.zeros(total, np.float32)
            a, b = int(tone_at * rate), int(min(seconds, tone_at + 0.5) * rate)
            sig[a:b] = 0.6 * np.sin(2 * np.pi * 1000 * np.arange(b - a) / rate)
            for start in range(0, total, chunk):
                part = sig[start : start + chunk].reshape(1, -1)
                aframe = av.AudioFrame.from_ndarray(part, format="flt", layout="mono")
                aframe.sample_rate = rate
                aframe.pts = start
                for packet in a_s.encode(aframe):
                    out.mux(packet)
            for packet in a_s.encode():
                out.mux(packet)
    return path


def make_jpeg(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    """A small JPEG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def make_speech_wav(text: str = "enciende la luz de la cocina", rate: int = 16000, seconds: float = 1.0) -> bytes:
    """16-bit mono WAV: espeak-ng speaking ``text`` when installed, else a synthesised vowel-like tone."""
    if shutil.which("espeak-ng"):
        raw = subprocess.run(["espeak-ng", "-v", "es", "--stdout", text], capture_output=True, check=True).stdout
        with wave.open(io.BytesIO(raw)) as src:
            src_rate = src.getframerate()
            pcm = np.frombuffer(src.readframes(src.getnframes()), "<i2").astype(np.float32)
        idx = np.arange(0, len(pcm), src_rate / rate)
        pcm = np.interp(idx, np.arange(len(pcm)), pcm)
    else:
        t = np.arange(int(rate * seconds)) / rate
        pcm = 8000 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t) ** 2
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.clip(pcm, -32768, 32767).astype("<i2").tobytes())
    return buf.getvalue()


def naive_prepare(source: str, fps: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """The naive reference for benchmarks: decode every frame to RGB, pick by index, decode all audio."""
    import av

    with av.open(source) as container:
        all_frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        rate = float(container.streams.video[0].average_rate or 25)
    picked = np.stack(all_frames[:: max(1, round(rate / fps))])
    with av.open(source) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=16000)
        parts = [o.to_ndarray().reshape(-1) for f in container.decode(audio=0) for o in resampler.resample(f)]
    return picked, np.concatenate(parts) if parts else np.zeros(0, np.float32)
