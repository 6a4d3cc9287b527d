"""A short synthetic video built from real photos: the astronaut's and Zidane's heads (packaged with
scikit-image and ultralytics) pasted on a gradient with a moving offset and a changing scale, with
an AAC tone as its audio track. Tests and benchmarks detail it with the real face detector.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image

from deployments.testing import assets

# head-and-shoulders windows around each photo's detected face (x1, y1, x2, y2)
ASTRONAUT_HEAD = (130, 10, 330, 230)
ZIDANE_HEAD = (855, 40, 1115, 330)


@dataclass(frozen=True)
class ClipSpec:
    frames: int = 24
    width: int = 320
    height: int = 240
    fps: Fraction = Fraction(12)
    audio: bool = True
    sample_rate: int = 16000


def _head(photo: np.ndarray, window: tuple[int, int, int, int], scale: float) -> np.ndarray:
    x1, y1, x2, y2 = window
    head = Image.fromarray(photo[y1:y2, x1:x2])
    size = (max(1, round((x2 - x1) * scale)), max(1, round((y2 - y1) * scale)))
    return np.asarray(head.resize(size, Image.Resampling.LANCZOS))


def _paste(canvas: np.ndarray, image: np.ndarray, x: int, y: int) -> None:
    height, width = canvas.shape[:2]
    h, w = image.shape[:2]
    left, top = max(x, 0), max(y, 0)
    right, bottom = min(x + w, width), min(y + h, height)
    if right > left and bottom > top:
        canvas[top:bottom, left:right] = image[top - y : bottom - y, left - x : right - x]


def clip_frames(spec: ClipSpec = ClipSpec()) -> list[np.ndarray]:
    """The frames: the astronaut crosses from left to centre, Zidane grows and drifts up on the right."""
    astronaut, zidane = assets.astronaut(), assets.zidane()
    ys, xs = np.mgrid[0 : spec.height, 0 : spec.width]
    background = np.stack([60 + 80 * xs / spec.width, 90 + 60 * ys / spec.height, 120 + 0 * xs], -1).astype(np.uint8)
    frames = []
    for k in range(spec.frames):
        t = k / max(1, spec.frames - 1)
        canvas = background.copy()
        head = _head(astronaut, ASTRONAUT_HEAD, 0.55)
        _paste(canvas, head, round(4 + 70 * t), round(20 + 6 * math.sin(2 * math.pi * t)))
        head = _head(zidane, ZIDANE_HEAD, 0.34 + 0.08 * t)
        _paste(canvas, head, round(spec.width - 118 - 10 * t), round(spec.height - head.shape[0] - 4 * t))
        frames.append(canvas)
    return frames


def encode_clip(frames: list[np.ndarray], spec: ClipSpec = ClipSpec(), container: str = "mp4") -> bytes:
    """``frames`` as an H.264 file at ``spec.fps``, with a 440 Hz AAC tone as long as the video."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as output:
        video = output.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=spec.fps)
        video.width, video.height, video.pix_fmt = spec.width, spec.height, "yuv420p"
        video.options = {"crf": "12"} if video.codec_context.name == "libx264" else {}
        audio = None
        if spec.audio:
            audio = output.add_stream("aac", rate=spec.sample_rate)
            audio.layout = "mono"
        for index, image in enumerate(frames):
            # single-threaded conversion, as serve_app.video.codec does (a threaded one hangs a later fork)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p", threads=1)
            frame.pts = index
            output.mux(video.encode(frame))
        output.mux(video.encode(None))
        if audio is not None:
            total = int(len(frames) / spec.fps * spec.sample_rate)
            chunk = 1024
            for start in range(0, total, chunk):
                times = np.arange(start, min(start + chunk, total)) / spec.sample_rate
                samples = (0.2 * np.sin(2 * math.pi * 440 * times)).astype(np.float32)[None]
                frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                frame.sample_rate, frame.pts = spec.sample_rate, start
                output.mux(audio.encode(frame))
            output.mux(audio.encode(None))
    return buffer.getvalue()


def synthetic_clip(spec: ClipSpec = ClipSpec()) -> bytes:
    return encode_clip(clip_frames(spec), spec)
