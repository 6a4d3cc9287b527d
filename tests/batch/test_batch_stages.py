"""The read and write stages without Ray: bad inputs become manifest rows; outputs and rows are committed."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from serve_app.batch.inputs import list_inputs
from serve_app.batch.job import BatchConfigError, _start_job, plan_job
from serve_app.batch.manifest import ERROR, OK, REJECTED, Manifest
from serve_app.batch.stages import read_images, write_outputs
from serve_app.batch.storage import resolve
from serve_app.batch.work import ImageWork, table_of, works_of
from serve_app.config import Limits
from serve_app.pipeline import ImageResult, SegmentReport

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "local-cpu.yaml"
WORKFLOW = REPO / "tests" / "core" / "workflows" / "facedetailer_ui.json"


def encoded(size: tuple[int, int], format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(buffer, format=format)
    return buffer.getvalue()


def read_stage(folder: Path, limits: Limits) -> dict[str, ImageWork]:
    listing = list_inputs(str(folder))
    items = [
        {"input": item.input, "key": item.key, "path": item.path, "source": item.source, "size": item.size}
        for item in listing.files
    ]
    import pyarrow as pa

    table = read_images(pa.Table.from_pylist(items), filesystems=listing.filesystems, limits=limits)
    return {work.key: work for work in works_of(table)}


def test_bad_inputs_are_rejected_rows_and_good_ones_go_on(tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.png").write_bytes(encoded((80, 64)))
    (folder / "truncated.png").write_bytes(encoded((80, 64))[:60])
    (folder / "text.jpg").write_bytes(b"not an image at all")
    (folder / "empty.webp").write_bytes(b"")
    (folder / "animated.png").write_bytes(encoded((80, 64), "GIF"))  # a GIF under a .png name
    (folder / "wide.png").write_bytes(encoded((300, 300)))  # over max_image_pixels below
    (folder / "heavy.jpg").write_bytes(encoded((64, 64)) + bytes(3000))  # over max_upload_bytes below
    works = read_stage(folder, Limits(max_upload_bytes=2048, max_image_pixels=200 * 200))
    good = works.pop("good")
    assert good.status == OK and good.image.shape == (64, 80, 3) and "decode" in good.timings
    expected = {
        "truncated": "corrupt or truncated",
        "text": "not an image",
        "empty": "empty upload",
        "animated": "format GIF is not accepted",
        "wide": "90000 pixels exceeds the limit of 40000",
        "heavy": "exceeds the limit of 2048 bytes",
    }
    assert {key: work.status for key, work in works.items()} == dict.fromkeys(expected, REJECTED)
    for key, message in expected.items():
        assert message in works[key].error, (key, works[key].error)
        assert works[key].image is None


def test_a_file_gone_between_listing_and_reading_is_an_error_tried_again(tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "gone.png").write_bytes(encoded((32, 32)))
    listing = list_inputs(str(folder))
    (folder / "gone.png").unlink()
    import pyarrow as pa

    item = listing.files[0]
    row = {"input": item.input, "key": item.key, "path": item.path, "source": item.source, "size": None}
    [work] = works_of(read_images(pa.Table.from_pylist([row]), filesystems=listing.filesystems, limits=Limits()))
    assert work.status == ERROR and "no such file" in work.error


def detailed(work: ImageWork) -> ImageWork:
    image = np.full((16, 24, 3), 7, np.uint8)
    segment = SegmentReport(index=0, bbox=(1, 2, 9, 10), crop_region=(0, 0, 16, 16), confidence=0.9, label="face",
                            seed=42)  # fmt: skip
    work.result = ImageResult(image, np.zeros((16, 24), np.uint8), [image[:8, :8]], [image[:8, :8, 0]], [segment])
    work.width, work.height, work.image = 24, 16, None
    work.timings = {"read": 0.01, "inpaint": 0.5}
    return work


def test_the_write_stage_commits_outputs_then_one_row_per_input(tmp_path: Path):
    output = resolve(str(tmp_path / "out"))
    done = detailed(ImageWork(input="/in/sub/a.png", key="sub/a", path="/in/sub/a.png", source="input"))
    bad = ImageWork(input="/in/b.png", key="b", path="/in/b.png", source="input")
    bad.fail(ValueError("b.png: not an image"))
    rows = write_outputs(table_of([done, bad]), output=output, outputs=("image", "json", "crops"), run_id="r1")
    assert rows.column("status").to_pylist() == [OK, REJECTED]
    written = sorted(
        str(path.relative_to(tmp_path / "out")) for path in (tmp_path / "out").rglob("*") if path.is_file()
    )
    journal = [name for name in written if name.startswith(".batch/journal/")]
    assert len(journal) == 1 and journal[0].startswith(".batch/journal/r1-")
    assert sorted(set(written) - set(journal)) == [
        "sub/a.alpha-0.png",
        "sub/a.json",
        "sub/a.png",
        "sub/a.refined-0.png",
    ]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out/sub/a.png")), done.result.image)
    report = json.loads((tmp_path / "out/sub/a.json").read_text())
    assert report["faces_refined"] == 1 and report["segments"][0]["seed"] == 42
    table = Manifest(output).compact()
    assert not (tmp_path / "out/.batch/journal").exists() or not any((tmp_path / "out/.batch/journal").iterdir())
    by_key = {row["key"]: row for row in pq.read_table(tmp_path / "out/manifest.parquet").to_pylist()}
    assert table.num_rows == 2
    assert by_key["sub/a"]["seeds"] == [42] and by_key["sub/a"]["faces_refined"] == 1
    assert by_key["sub/a"]["outputs"] == ["sub/a.png", "sub/a.refined-0.png", "sub/a.alpha-0.png", "sub/a.json"]
    timings = by_key["sub/a"]["timings"]
    assert timings["read"] == 0.01 and timings["inpaint"] == 0.5 and timings["write"] > 0
    assert by_key["sub/a"]["seconds"] == pytest.approx(0.51 + timings["write"])
    assert by_key["b"]["outputs"] == [] and by_key["b"]["error"] == "b.png: not an image"


def test_a_workflow_gives_the_parameters_and_resuming_with_other_ones_is_refused(tmp_path: Path):
    from facedetailer.workflow import import_workflow

    plan = plan_job(CONFIG, (), (), None, None, WORKFLOW, None, "image")
    assert (
        plan.params.model_dump()
        == plan.params.model_validate(import_workflow(WORKFLOW.read_text()).params).model_dump()
    )
    output = resolve(str(tmp_path / "out"))
    manifest = Manifest(output)
    _start_job(output, manifest, plan.fingerprint, True, "in/")
    manifest.append([{"input": "/in/a.png", "key": "a", "status": OK, "outputs": ["a.png"]}], "r1")
    other = plan_job(CONFIG, (), (), {"steps": 3}, None, WORKFLOW, None, "image")
    with pytest.raises(BatchConfigError, match=r"other settings \(params.steps: 12 → 3\).*--no-resume"):
        _start_job(output, manifest, other.fingerprint, True, "in/")
    _start_job(output, manifest, other.fingerprint, False, "in/")  # --no-resume: the rows are forgotten
    assert manifest.read()[0].num_rows == 0
    job = json.loads((tmp_path / "out/.batch/job.json").read_text())
    assert job["fingerprint"]["params"]["steps"] == 3 and job["runs"] == []
