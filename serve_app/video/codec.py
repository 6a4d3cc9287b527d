"""Video files in and out with PyAV (FFmpeg): frames decoded to RGB, the detailed frames encoded
with their original timestamps, the audio packets copied untouched.

- **Video codec**: H.264 (``libx264``, shipped in PyAV's wheels) at ``crf``; where the FFmpeg build
  has no libx264, MPEG-4 Part 2 (``mpeg4``, always built in) at a matching quality — the result
  says which. 4:2:0 chroma needs even sizes: an odd-sized video is encoded 4:4:4 with H.264
  (High 4:4:4 profile; fewer players take it) or padded by one pixel row/column with MPEG-4.
- **Timestamps**: every frame keeps its presentation timestamp in the input stream's time base,
  so the frame rate, a variable frame rate and the start offset stay as they were.
- **Audio**: the first audio stream's packets are remuxed as they are (no re-encoding), interleaved
  by time with the video packets.
- **Container**: ``mp4`` (default), ``mov`` or ``mkv``; an audio codec the chosen container cannot
  hold (e.g. PCM or Vorbis in mp4) moves the output to Matroska (``mkv``), and the result says so.
- **Pixel conversion** (RGB <-> YUV) runs single-threaded (``SWS_THREADS``): swscale's slice-thread
  pool would otherwise live in a thread-local (PyAV caches one converter per thread) or in the
  encoder's context, and a process that forks with ``preexec_fn`` after that (``ray.init`` does)
  frees it in the child, where its threads do not exist, and hangs. The pixels are the same.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

Container = Literal["mp4", "mov", "mkv"]
CONTAINERS: dict[str, str] = {"mp4": "mp4", "mov": "mov", "mkv": "matroska"}  # our name → FFmpeg muxer
MEDIA_TYPES: dict[str, str] = {"mp4": "video/mp4", "mov": "video/quicktime", "mkv": "video/x-matroska"}
# audio codecs FFmpeg's mp4/mov muxers accept as they are (others go to Matroska, which takes any)
_AUDIO_IN_MP4 = {"aac", "mp3", "mp2", "ac3", "eac3", "opus", "flac", "alac"}
_AUDIO_IN_MOV = _AUDIO_IN_MP4 | {"pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s24be", "pcm_f32le", "pcm_u8"}

Source = str | Path | bytes
FF_QP2LAMBDA = 118  # FFmpeg: a quantiser in lambda units
SWS_THREADS = 1  # swscale without its slice-thread pool (see the module docstring)


class VideoInputError(ValueError):
    """The upload is not a video we can read (HTTP 415/422), or it is over a limit (see ``limit``)."""

    def __init__(self, message: str, *, status_code: int = 422, limit: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.limit = limit


@dataclass(frozen=True)
class VideoInfo:
    """What the container says before decoding (``frames`` 0 = unknown)."""

    width: int
    height: int
    frames: int
    duration_s: float
    average_rate: Fraction | None
    time_base: Fraction
    format_name: str
    video_codec: str
    audio_codec: str | None


@dataclass
class DecodedVideo:
    """RGB uint8 frames in presentation order, with their timestamps in ``info.time_base``."""

    frames: list[np.ndarray]
    pts: list[int]
    info: VideoInfo


@dataclass(frozen=True)
class EncodedVideo:
    """The written file's facts."""

    data: bytes | None  # the file's bytes when written to memory
    container: str
    video_codec: str
    pixel_format: str
    audio_copied: bool
    frames: int


def _reason(error: Exception) -> str:
    """FFmpeg's reason (e.g. "Invalid data found when processing input"), without errno or file name."""
    return str(getattr(error, "strerror", None) or type(error).__name__)


def _open(source: Source) -> Any:
    import av

    try:
        return av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), "r")
    except (av.FFmpegError, OSError, ValueError) as error:
        raise VideoInputError(f"video: not a readable video file ({_reason(error)})", status_code=415) from error


def _info(container: Any) -> VideoInfo:
    if not container.streams.video:
        raise VideoInputError("video: the file has no video stream", status_code=415)
    stream = container.streams.video[0]
    audio = container.streams.audio[0] if container.streams.audio else None
    time_base = stream.time_base or Fraction(1, 90000)
    if stream.duration is not None:
        duration = float(stream.duration * time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000  # AV_TIME_BASE
    else:
        duration = 0.0
    return VideoInfo(
        width=int(stream.codec_context.width),
        height=int(stream.codec_context.height),
        frames=int(stream.frames or 0),
        duration_s=duration,
        average_rate=stream.average_rate,
        time_base=time_base,
        format_name=container.format.name,
        video_codec=stream.codec_context.name,
        audio_codec=audio.codec_context.name if audio is not None else None,
    )


def probe_video(source: Source) -> VideoInfo:
    """The container's facts, without decoding a frame."""
    with _open(source) as container:
        return _info(container)


def decode_video(source: Source, *, max_frames: int | None = None) -> DecodedVideo:
    """Every frame as RGB uint8 [H, W, 3]; more than ``max_frames`` is a :class:`VideoInputError`.

    A frame without a timestamp gets the previous one plus one frame at the average rate.
    """
    import av

    with _open(source) as container:
        info = _info(container)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames: list[np.ndarray] = []
        pts: list[int] = []
        step = _frame_step(info)
        try:
            for frame in container.decode(stream):
                if max_frames is not None and len(frames) >= max_frames:
                    raise VideoInputError(
                        f"video: more than {max_frames} frames, over limits.max_video_frames",
                        limit="max_video_frames",
                    )
                frames.append(frame.to_ndarray(format="rgb24", threads=SWS_THREADS))
                stamp = frame.pts if frame.pts is not None else (pts[-1] + step if pts else 0)
                pts.append(int(stamp))
        except av.FFmpegError as error:
            message = f"video: decoding failed at frame {len(frames)} ({_reason(error)})"
            raise VideoInputError(message, status_code=415) from error
    if not frames:
        raise VideoInputError("video: the video stream has no frame", status_code=415)
    height, width = frames[0].shape[:2]
    return DecodedVideo(frames, pts, _replace_size(info, width, height))


def _replace_size(info: VideoInfo, width: int, height: int) -> VideoInfo:
    from dataclasses import replace

    return replace(info, width=width, height=height)


def _frame_step(info: VideoInfo) -> int:
    """One frame's duration in the stream's time base (1 when the rate is unknown)."""
    if not info.average_rate:
        return 1
    return max(1, round(1 / (info.average_rate * info.time_base)))


def pick_container(requested: Container, audio_codec: str | None) -> Container:
    """``requested``, unless it cannot hold the audio as it is: then ``mkv``."""
    if audio_codec is None or requested == "mkv":
        return requested
    allowed = _AUDIO_IN_MP4 if requested == "mp4" else _AUDIO_IN_MOV
    return requested if audio_codec in allowed else "mkv"


def video_encoder() -> str:
    """``libx264`` where this FFmpeg build has it, else ``mpeg4``."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def encode_video(
    frames: Sequence[np.ndarray],
    pts: Sequence[int],
    info: VideoInfo,
    *,
    audio_source: Source | None,
    target: str | Path | None = None,
    container: Container = "mp4",
    crf: int = 18,
    encoder: str | None = None,
) -> EncodedVideo:
    """Encode ``frames`` at their ``pts`` (in ``info.time_base``), with ``audio_source``'s first audio
    stream copied; to ``target`` (written whole, then renamed) or to memory (``target`` None)."""
    import av

    if len(frames) != len(pts):
        raise ValueError(f"{len(frames)} frames but {len(pts)} timestamps")
    chosen = pick_container(container, info.audio_codec if audio_source is not None else None)
    codec = encoder or video_encoder()
    height, width = frames[0].shape[:2]
    odd = width % 2 or height % 2
    pixel_format = "yuv444p" if odd and codec == "libx264" else "yuv420p"
    pad = (height % 2, width % 2) if odd and pixel_format == "yuv420p" else (0, 0)
    buffer: BinaryIO = io.BytesIO()
    partial = Path(str(target) + ".partial") if target is not None else None
    output = av.open(buffer if partial is None else str(partial), "w", format=CONTAINERS[chosen])
    audio_copied = False
    try:
        stream = output.add_stream(codec, rate=info.average_rate or Fraction(25, 1))
        stream.width, stream.height = width + pad[1], height + pad[0]
        stream.pix_fmt = pixel_format
        stream.time_base = info.time_base
        stream.codec_context.time_base = info.time_base
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "medium"}
        else:  # MPEG-4's fixed quantiser 2 (best) … 31, crf 0…51 mapped onto it (FFmpeg's -q:v)
            stream.codec_context.qscale = True
            stream.codec_context.global_quality = max(2, min(31, 2 + round(crf * 29 / 51))) * FF_QP2LAMBDA
        audio_packets: list[Any] = []
        audio_stream = None
        if audio_source is not None and info.audio_codec is not None:
            reader = _open(audio_source)
            source_audio = reader.streams.audio[0]
            audio_stream = output.add_stream_from_template(source_audio)
            audio_packets = [packet for packet in reader.demux(source_audio) if packet.dts is not None]
            reader.close()
        pending_audio = iter(sorted(audio_packets, key=lambda packet: float(packet.dts * packet.time_base)))
        next_audio = next(pending_audio, None)

        def mux_audio_until(seconds: float | None) -> None:
            nonlocal next_audio, audio_copied
            while next_audio is not None and (seconds is None or next_audio.dts * next_audio.time_base <= seconds):
                next_audio.stream = audio_stream
                output.mux(next_audio)
                audio_copied = True
                next_audio = next(pending_audio, None)

        def mux_video(packets: Sequence[Any]) -> None:
            for packet in packets:
                if packet.dts is not None:
                    mux_audio_until(float(packet.dts * packet.time_base))
                output.mux(packet)

        for image, stamp in zip(frames, pts, strict=True):
            if pad != (0, 0):
                image = np.pad(image, ((0, pad[0]), (0, pad[1]), (0, 0)), mode="edge")
            rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            # converted here, so the encoder's context never builds a threaded converter of its own
            frame = rgb.reformat(format=pixel_format, threads=SWS_THREADS)
            frame.pts = int(stamp)
            frame.time_base = info.time_base
            mux_video(stream.encode(frame))
        mux_video(stream.encode(None))
        mux_audio_until(None)
    except BaseException:
        output.close()
        if partial is not None:
            partial.unlink(missing_ok=True)
        raise
    output.close()
    if partial is not None and target is not None:
        partial.replace(target)  # never leave a half-written output behind
        data = None
    else:
        data = buffer.getvalue()  # type: ignore[attr-defined]
    return EncodedVideo(data, chosen, codec, pixel_format, audio_copied, len(frames))
