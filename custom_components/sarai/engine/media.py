"""Clip preparation for time-aligned video analysis: frames sampled by timestamp + 16 kHz mono audio.

One pass over the container with PyAV: packets of the video and audio streams are demuxed
together, video is decoded with frame threading, only the frames picked for the requested fps
are converted (scaled down in libswscale by ``frame.reformat`` with area averaging, which is
both the right filter for downscaling and ~3x faster than the default), and audio is resampled to 16 kHz
mono by ``av.AudioResampler`` as it arrives. Nothing is written to disk and the clip is never
held in memory as a whole; a stream that stops answering is an error after ``timeout_s``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
import io
import math
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from .errors import InvalidInput, MediaUnavailable
from .files import display_name, open_regular

HEAR_RATE = 16000
MAX_DURATION_S = 30.0
MAX_FPS = 8.0
# Live sources: network schemes only. FFmpeg may use these protocols underneath them (HLS over
# HTTP(S), RTSP over TCP/UDP/RTP/TLS); never file, pipe, fd, concat, subfile or data.
NETWORK_SCHEMES = ("http", "https", "rtsp", "rtsps", "rtmp", "rtmps", "rtmpt", "rtmpts", "srt", "tcp", "udp", "rtp")
NETWORK_PROTOCOLS = "http,https,tls,tcp,udp,rtp,srtp,rtsp,rtsps,rtmp,rtmps,rtmpt,rtmpts,srt,crypto,httpproxy"
# Local files: ordinary video containers only (no HLS playlists, concat lists or image sequences,
# which would make FFmpeg open further paths named inside the file).
LOCAL_FORMATS = "mov,mp4,matroska,webm,avi,mpegts,flv,mpeg,ogg,asf,h264,hevc,mjpeg,m4v,ivf,wav,mp3,aac"
PATCH = 28  # Qwen2.5-Omni vision: 14 px patches merged 2x2
MAX_ASPECT = 50


@dataclass(slots=True)
class Clip:
    """A prepared clip: frames with their real timestamps, the real fps, and the audio track."""

    frames: np.ndarray  # (T, H, W, 3) uint8
    frame_times: list[float]
    fps: float
    audio: np.ndarray | None  # float32, 16 kHz mono
    audio_start_s: float
    duration_s: float
    source_fps: float | None
    warnings: list[str] = field(default_factory=list)

    @property
    def audio_s(self) -> float:
        """Seconds of audio."""
        return 0.0 if self.audio is None else round(self.audio.size / HEAR_RATE, 3)

    def summary(self) -> dict[str, Any]:
        """Plain description (no arrays)."""
        return {
            "frames": len(self.frame_times),
            "frame_times": [round(t, 3) for t in self.frame_times],
            "fps": self.fps,
            "size": list(self.frames.shape[1:3]) if self.frames.size else [0, 0],
            "audio_s": self.audio_s,
            "audio_start_s": round(self.audio_start_s, 3),
            "duration_s": round(self.duration_s, 3),
            "warnings": list(self.warnings),
        }


def target_size(width: int, height: int, max_pixels: int, max_aspect: int = MAX_ASPECT) -> tuple[int, int]:
    """Largest size of the same aspect within ``max_pixels``, in multiples of the 28 px patch.

    An aspect beyond 1:``max_aspect`` (in either orientation) is squeezed to it: the vision
    processors refuse extreme aspects, and a frame of a clip cannot be letterboxed per frame cheaply.
    """
    width, height = max(1, width), max(1, height)
    width = min(width, height * max_aspect)
    height = min(height, width * max_aspect)
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    w = max(PATCH, int(width * scale) // PATCH * PATCH)
    h = max(PATCH, int(height * scale) // PATCH * PATCH)
    return w, h


def validate_request(duration_s: float, fps: float) -> None:
    """Reject durations and rates the pipeline will not prepare."""
    if not 0 < duration_s <= MAX_DURATION_S:
        raise InvalidInput(
            f"duration must be between 0 and {MAX_DURATION_S:g} s", key="video_duration", max_s=f"{MAX_DURATION_S:g}"
        )
    if not 0 < fps <= MAX_FPS:
        raise InvalidInput(f"fps must be between 0 and {MAX_FPS:g}", key="video_fps", max_fps=f"{MAX_FPS:g}")


def source_name(source: str) -> str:
    """What a source is called in messages: a file's name, or a stream's scheme and host (never credentials)."""
    parts = urlsplit(source)
    if parts.scheme in NETWORK_SCHEMES:
        return f"{parts.scheme}://{parts.hostname or ''}"
    return display_name(local_path(source) or source)


def local_path(source: str) -> str | None:
    """The local path of a bare path or ``file:`` URL; None for anything else."""
    parts = urlsplit(source)
    if parts.scheme == "":  # a path
        return source
    if parts.scheme == "file" and parts.netloc in ("", "localhost"):
        return unquote(parts.path)
    return None


@contextmanager
def open_source(source: str, timeout_s: float) -> Iterator[Any]:
    """Open a clip for demuxing without ever blocking for good.

    A local file (a bare path or ``file:`` URL) must be a regular file: it is opened by SARAi
    (``files.open_regular``: no FIFO, device, directory or socket, whatever the name or symlink) and
    handed to FFmpeg as a file object, restricted to ordinary video containers (``format_whitelist``:
    no playlists or concat lists that would make FFmpeg open further paths). A live stream may only use
    network protocols (``protocol_whitelist``: never ``file``, ``pipe`` or ``fd``), with FFmpeg's
    timeouts on opening and on every read. Other schemes are refused.
    """
    import av

    name = source_name(source)
    path = local_path(source)
    scheme = urlsplit(source).scheme
    with ExitStack() as stack:
        target: Any
        if path is not None:
            target = stack.enter_context(open_regular(path))
            options = {"format_whitelist": LOCAL_FORMATS}
        elif scheme in NETWORK_SCHEMES:
            target = source
            options = {"protocol_whitelist": NETWORK_PROTOCOLS, "rw_timeout": str(int(timeout_s * 1e6))}
        else:
            raise InvalidInput(
                f"unsupported stream source scheme {scheme!r}", key="video_source_unsupported", scheme=scheme
            )
        try:
            container = av.open(target, timeout=(timeout_s, timeout_s), options=options)
        except (av.error.FFmpegError, OSError) as err:
            detail = str(err).replace(source, name)  # a stream URL may carry credentials: not even in the log
            if path is not None or isinstance(err, av.error.InvalidDataError):  # there, but not a usable video
                raise InvalidInput(f"not a video: {detail}", key="video_invalid", source=name) from err
            raise MediaUnavailable(f"cannot open the stream: {detail}", reason="unreachable") from err
        stack.enter_context(container)
        yield container


def prepare_clip(
    source: str,
    duration_s: float = 6.0,
    fps: float = 2.0,
    with_audio: bool = True,
    max_pixels: int = 448 * 448,
    timeout_s: float = 15.0,
) -> Clip:
    """Read ``duration_s`` seconds from a file or live URL into frames at ``fps`` and 16 kHz audio."""

    validate_request(duration_s, fps)
    deadline = time.monotonic() + timeout_s + duration_s
    name = source_name(source)
    with open_source(source, timeout_s) as container:
        return _clip(container, source, name, duration_s, fps, with_audio, max_pixels, deadline)


def prepare_clip_bytes(data: bytes, fps: float, with_audio: bool, max_pixels: int = 448 * 448) -> Clip:
    """A clip from video bytes in memory (nothing on disk): the first ``MAX_DURATION_S`` seconds, frames at
    ``fps`` and 16 kHz audio; ordinary video containers only (as for local files)."""
    import av

    validate_request(MAX_DURATION_S, fps)
    name = "video_url"
    try:
        container = av.open(io.BytesIO(data), options={"format_whitelist": LOCAL_FORMATS})
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise InvalidInput(f"not a video: {err}", key="video_invalid", source=name) from err
    with container:
        return _clip(container, name, name, MAX_DURATION_S, fps, with_audio, max_pixels, time.monotonic() + 120)


def encode_mp4(frames: np.ndarray, fps: float, audio16: np.ndarray | None = None) -> bytes:
    """Prepared frames (T, H, W, 3 uint8, at ``fps``) and 16 kHz mono audio as one small MP4 in memory:
    H.264 (MPEG-4 Part 2 where PyAV has no libx264) + AAC. For servers that take a whole clip (vLLM's
    ``video_url``): the clip is already cut to its duration, sampled and scaled down, and a live stream's
    packets never reach the server as they came."""
    import av

    if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[3] != 3 or min(frames.shape[1:3]) < 2:
        raise InvalidInput("a clip needs RGB frames", key="video_invalid", source="frames")
    frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]  # yuv420p: even sides
    height, width = frames.shape[1:3]
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        video: Any = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))  # codec named at run time
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            video.options = {"preset": "ultrafast"}
        sound = out.add_stream("aac", rate=HEAR_RATE, layout="mono") if audio16 is not None and audio16.size else None
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb, dtype=np.uint8), format="rgb24")
            frame.pts = index
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if sound is not None and audio16 is not None:
            samples = np.clip(np.asarray(audio16, dtype=np.float32), -1.0, 1.0)
            for start in range(0, samples.size, 1024):
                chunk = av.AudioFrame.from_ndarray(
                    samples[start : start + 1024].reshape(1, -1), format="flt", layout="mono"
                )
                chunk.sample_rate, chunk.pts = HEAR_RATE, start
                out.mux(sound.encode(chunk))
            out.mux(sound.encode())
    return buf.getvalue()


def _clip(
    container: Any,
    source: str,
    name: str,
    duration_s: float,
    fps: float,
    with_audio: bool,
    max_pixels: int,
    deadline: float,
) -> Clip:
    """The clip from an open container; errors name the source by ``name`` only (no URL, no credentials)."""
    import av

    if not container.streams.video:
        raise InvalidInput("the clip has no video stream", key="video_no_stream", source=name)
    vstream = container.streams.video[0]
    vstream.thread_type = "AUTO"
    astream = container.streams.audio[0] if (with_audio and container.streams.audio) else None
    warnings: list[str] = []
    if with_audio and astream is None:
        warnings.append("no audio track: analysed the video only")
    try:
        return _read(container, vstream, astream, duration_s, fps, max_pixels, deadline, warnings, name)
    except (av.error.ExitError, av.error.FFmpegError) as err:
        detail = str(err).replace(source, name)
        if "timed out" in detail.lower() or isinstance(err, av.error.ExitError):
            raise MediaUnavailable(f"the stream stopped answering: {detail}", reason="timeout") from err
        raise InvalidInput(f"cannot decode the clip: {detail}", key="video_invalid", source=name) from err


def _read(
    container: Any,
    vstream: Any,
    astream: Any,
    duration_s: float,
    fps: float,
    max_pixels: int,
    deadline: float,
    warnings: list[str],
    name: str,
) -> Clip:
    import av

    size: tuple[int, int] | None = None
    frames: list[np.ndarray] = []
    times: list[float] = []
    start: float | None = None
    next_t = 0.0
    last_t = 0.0
    step = 1.0 / fps
    audio_parts: list[np.ndarray] = []
    audio_start: float | None = None
    resampler = av.AudioResampler(format="flt", layout="mono", rate=HEAR_RATE) if astream is not None else None
    video_done = False
    audio_done = astream is None
    streams = [s for s in (vstream, astream) if s is not None]
    damaged = 0
    for packet in container.demux(streams):
        if time.monotonic() > deadline:
            raise MediaUnavailable("the stream did not deliver the clip in time", reason="timeout")
        decoded = _decode(packet)
        if decoded is None:  # a damaged packet: live streams have them; skip it, count it
            damaged += 1
            continue
        if packet.stream is vstream and not video_done:
            for frame in decoded:
                if start is None:
                    start = frame.time
                t = frame.time - start
                if t >= duration_s:
                    video_done = True
                    break
                last_t = max(last_t, t)
                if t + 1e-6 < next_t:
                    continue
                if size is None:
                    size = target_size(frame.width, frame.height, max_pixels)
                frames.append(
                    frame.reformat(width=size[0], height=size[1], format="rgb24", interpolation="AREA").to_ndarray()
                )
                times.append(t)
                next_t = (math.floor(t / step + 1e-6) + 1) * step
        elif packet.stream is astream and not audio_done:
            assert resampler is not None
            for aframe in decoded:
                base = start if start is not None else aframe.time
                if audio_start is None:
                    audio_start = aframe.time - base
                if aframe.time - base >= duration_s:
                    audio_done = True
                    break
                for out in resampler.resample(aframe):
                    audio_parts.append(out.to_ndarray().reshape(-1))
        if video_done and audio_done:
            break
    if resampler is not None and not audio_done:
        for out in resampler.resample(None):
            audio_parts.append(out.to_ndarray().reshape(-1))
    if not frames:
        raise InvalidInput("the clip has no decodable video frames", key="video_invalid", source=name)
    if damaged:
        warnings.append(f"{damaged} damaged packets skipped")
    audio = None
    if astream is not None:
        audio = np.concatenate(audio_parts).astype(np.float32) if audio_parts else np.zeros(0, np.float32)
        audio = audio[: int(duration_s * HEAR_RATE)]
        if not audio.size:
            warnings.append("the audio track is empty: analysed the video only")
            audio = None
    src_rate = float(vstream.average_rate) if vstream.average_rate else None
    span = last_t + (1.0 / src_rate if src_rate else step)
    if audio is not None:
        span = max(span, audio.size / HEAR_RATE)
    return Clip(
        frames=np.stack(frames),
        frame_times=times,
        fps=fps,
        audio=audio,
        audio_start_s=audio_start or 0.0,
        duration_s=min(duration_s, span),
        source_fps=src_rate,
        warnings=warnings,
    )


def _decode(packet: Any) -> list[Any] | None:
    """The timestamped frames of one packet, or None when the packet is damaged."""
    import av

    try:
        return [frame for frame in packet.decode() if frame.time is not None]
    except av.error.InvalidDataError:
        return None
