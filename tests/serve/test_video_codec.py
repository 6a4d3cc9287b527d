"""The video codec leaves nothing behind that hangs a later fork.

PyAV keeps one swscale converter per thread (and one in an encoder's context); a threaded one owns
a slice-thread pool. A process that then forks with ``preexec_fn`` — ``ray.init`` starting its GCS
does — frees the other threads' converters in the child, where their pool's threads do not exist,
and the child hangs before it can exec (seen in the test session: ``ray.init`` after the video
tests waited forever). The check runs in a fresh interpreter, so a hang is a timeout, not a hung
session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from deployments.testing.video_clip import ClipSpec, synthetic_clip
from serve_app.video.codec import decode_video, encode_video

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_FORK_AFTER_VIDEO = textwrap.dedent(
    """
    import subprocess, threading
    from deployments.testing.video_clip import ClipSpec, synthetic_clip
    from serve_app.video.codec import decode_video, encode_video

    done, finish = threading.Event(), threading.Event()

    def worker():  # like an executor thread: it does the video work and stays alive
        clip = synthetic_clip(ClipSpec(frames=4, audio=False))
        video = decode_video(clip)
        encode_video(video.frames, video.pts, video.info, audio_source=None)
        encode_video(video.frames, video.pts, video.info, audio_source=None, encoder="mpeg4")
        done.set()
        finish.wait()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    assert done.wait(60), "the video work did not finish"
    child = subprocess.Popen(["true"], preexec_fn=lambda: None)  # what ray.init does to start its GCS
    print("forked", child.wait())
    finish.set()
    """
)


def test_a_fork_after_video_work_in_a_live_thread_does_not_hang() -> None:
    # its own session, so a hung fork child is killed with it
    process = subprocess.Popen(
        [sys.executable, "-c", _FORK_AFTER_VIDEO],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("the fork after the video work hung (swscale's slice threads freed in the child)")
    assert process.returncode == 0, stderr[-2000:]
    assert stdout.strip() == "forked 0"


def test_decode_then_encode_round_trips_the_frames_closely() -> None:
    """The single-threaded conversion still gives the clip back: every frame within H.264's error."""
    spec = ClipSpec(frames=4, audio=False)
    clip = synthetic_clip(spec)
    video = decode_video(clip)
    assert len(video.frames) == 4 and video.frames[0].shape == (spec.height, spec.width, 3)
    again = decode_video(encode_video(video.frames, video.pts, video.info, audio_source=None).data)
    error = np.abs(np.stack(again.frames).astype(int) - np.stack(video.frames)).mean()
    assert again.pts == video.pts
    assert 0 < error < 3, error
