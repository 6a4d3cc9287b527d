"""A bulk job gives what the service gives: every output of each image bit for bit equal to ``POST /v1/detail``.

The batch job runs in the session's Ray instance next to the served local-cpu.yaml app (same
config, tiny models, real face YOLO and LiteMedSAM). Its images go through Ray Data together, so
their crops share the refine actor's engine; each is also sent alone to the service.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from deployments.testing import assets

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local-cpu.yaml"
# SAM on (its stage too), several faces per image, small crops: a few seconds of tiny-model work
PARAMS = {"steps": 3, "guide_size": 192, "max_size": 320, "use_sam": True, "sam_detection_hint": "none", "seed": 7,
          "positive": "a (detailed:1.2) face"}  # fmt: skip
# The served apps (local config with its text encoder, segm and auth apps) hold 1.89 of the session's 2 CPUs:
# the batch job's actors and tasks ask for 0.01 each.
SMALL = [f"{part}.deployment.ray_actor_options.num_cpus=0.01" for part in ("detector", "sam", "inpainter")]


def decode(data: bytes | str) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)))


def test_a_batch_job_equals_post_v1_detail_bit_for_bit(serve_instance, tmp_path: Path, monkeypatch):
    from serve_app.batch import job, run_batch

    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(assets.zidane()).save(inputs / "zidane.jpg", quality=90)
    Image.fromarray(assets.astronaut()).save(inputs / "astronaut.png")
    monkeypatch.setattr(job, "TASK_CPUS", 0.01)
    summary = run_batch(
        str(inputs), str(tmp_path / "out"), config=CONFIG, sets=SMALL, params=PARAMS,
        outputs="image,mask,crops,json", progress=False,
    )  # fmt: skip
    assert (summary.succeeded, summary.failed, summary.exit_code) == (2, 0, 0)
    assert summary.faces_refined == 3
    rows = {row["key"]: row for row in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    with httpx.Client(base_url=serve_instance["url"], timeout=600, trust_env=False) as client:
        for key, filename in (("zidane", "zidane.jpg"), ("astronaut", "astronaut.png")):
            data = (inputs / filename).read_bytes()
            response = client.post(
                "/v1/detail?format=json",
                files={"image": (filename, data, "application/octet-stream")},
                data={"params": json.dumps(PARAMS)},
            )
            assert response.status_code == 200, response.text
            served = response.json()
            out = tmp_path / "out"
            assert np.array_equal(decode((out / f"{key}.png").read_bytes()), decode(served["image"])), key
            assert np.array_equal(decode((out / f"{key}.mask.png").read_bytes()), decode(served["mask"])), key
            for kind, outputs in (("refined", "cropped_refined"), ("alpha", "cropped_enhanced_alpha")):
                assert len(served[outputs]) == served["faces_refined"]
                for index, encoded in enumerate(served[outputs]):
                    assert np.array_equal(decode((out / f"{key}.{kind}-{index}.png").read_bytes()), decode(encoded))
            report = json.loads((out / f"{key}.json").read_text())
            assert report["segments"] == served["segments"][0]
            assert rows[key]["seeds"] == [segment["seed"] for segment in served["segments"][0]]
            assert rows[key]["faces_refined"] == served["faces_refined"]
            untouched = decode(data) if filename.endswith(".png") else None
            if untouched is not None:  # the job did refine something: the image changed
                assert not np.array_equal(decode((out / f"{key}.png").read_bytes()), untouched)
