"""Bulk jobs without Ray: listing inputs, atomic writes, the manifest under crashes, job checks."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve_app.batch.inputs import InputError, list_inputs
from serve_app.batch.job import BatchConfigError, plan_job
from serve_app.batch.manifest import ERROR, OK, REJECTED, Manifest, latest_per_input, rows_table
from serve_app.batch.outputs import parse_outputs
from serve_app.batch.storage import is_partial_file, remove_partial_files, resolve, write_atomic
from serve_app.batch.work import classify

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_a_folder_lists_images_recursively_skipping_hidden_files_and_the_output_inside_it(tmp_path: Path):
    for name in ("b.jpg", "a.PNG", "sub/c.webp", "sub/deeper/d.jpeg", "notes.txt", ".hidden.png", ".cache/e.png",
                 "out/f.png"):  # fmt: skip
        touch(tmp_path / name)
    listing = list_inputs(str(tmp_path), exclude=resolve(str(tmp_path / "out")))
    assert listing.kind == "folder"
    assert [item.key for item in listing.files] == ["a", "b", "sub/c", "sub/deeper/d"]
    assert listing.files[0].input == str(tmp_path / "a.PNG") and listing.files[0].size == 1


def test_inputs_differing_only_by_suffix_keep_it_in_their_keys(tmp_path: Path):
    for name in ("a.jpg", "a.png", "b.png"):
        touch(tmp_path / name)
    assert [item.key for item in list_inputs(str(tmp_path)).files] == ["a.jpg", "a.png", "b"]


def test_globs_match_within_a_folder_and_across_folders_with_double_star(tmp_path: Path):
    for name in ("x/1.jpg", "x/2.png", "x/y/3.jpg", "z/4.jpg", "x/.5.jpg"):
        touch(tmp_path / name)
    keys = [item.key for item in list_inputs(f"{tmp_path}/x/*.jpg").files]
    assert keys == ["1"]
    deep = list_inputs(f"{tmp_path}/**/*.jpg")
    assert deep.kind == "glob" and [item.key for item in deep.files] == ["x/1", "x/y/3", "z/4"]
    assert [item.key for item in list_inputs(f"{tmp_path}/x/[12].*").files] == ["1", "2"]


def test_text_and_parquet_lists_resolve_relative_entries_against_the_list(tmp_path: Path):
    touch(tmp_path / "imgs/a.jpg")
    touch(tmp_path / "imgs/more/b.png")
    touch(tmp_path / "elsewhere/c.jpg")
    (tmp_path / "list.txt").write_text(
        f"# inputs\nimgs/a.jpg\n\n{tmp_path}/imgs/more/b.png\nfile://{tmp_path}/elsewhere/c.jpg\n"
    )
    listing = list_inputs(str(tmp_path / "list.txt"))
    assert listing.kind == "list"
    assert [(item.key, item.input) for item in listing.files] == [
        ("elsewhere/c", str(tmp_path / "elsewhere/c.jpg")),
        ("imgs/a", str(tmp_path / "imgs/a.jpg")),
        ("imgs/more/b", str(tmp_path / "imgs/more/b.png")),
    ]
    pq.write_table(pa.table({"path": ["imgs/a.jpg", "imgs/more/b.png"]}), tmp_path / "list.parquet")
    assert [item.key for item in list_inputs(str(tmp_path / "list.parquet")).files] == ["a", "more/b"]
    pq.write_table(pa.table({"file": ["imgs/a.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="column named 'path'"):
        list_inputs(str(tmp_path / "bad.parquet"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(InputError, match="names no input"):
        list_inputs(str(tmp_path / "empty.txt"))
    with pytest.raises(InputError, match="no such file or folder"):
        list_inputs(str(tmp_path / "missing"))


def test_atomic_writes_replace_whole_files_and_leave_no_temporary(tmp_path: Path):
    location = resolve(str(tmp_path / "out"))
    target = location.join("a/b.png")
    write_atomic(location.filesystem, target, b"first")
    write_atomic(location.filesystem, target, b"second")
    assert Path(target).read_bytes() == b"second"
    assert sorted(os.listdir(tmp_path / "out/a")) == ["b.png"]
    # a writer killed before its rename leaves a hidden temporary only; the next run deletes it
    stale = touch(tmp_path / "out/a" / ".c.png.0123456789abcdef0123456789abcdef.partial")
    assert is_partial_file(stale.name) and not is_partial_file("b.png")
    assert remove_partial_files(location) == 1 and not stale.exists()


def row(input: str, status: str = OK, minute: int = 0, outputs: list[str] | None = None) -> dict:
    return {
        "input": input, "key": Path(input).stem, "status": status, "error": None if status == OK else "bad",
        "outputs": outputs if outputs is not None else [f"{Path(input).stem}.png"], "run_id": "r",
        "finished_at": dt.datetime(2026, 1, 1, 0, minute, tzinfo=dt.UTC),
    }  # fmt: skip


def test_the_manifest_keeps_the_latest_row_per_input_across_journal_and_compaction(tmp_path: Path):
    manifest = Manifest(resolve(str(tmp_path)))
    manifest.append([row("/in/a.jpg", ERROR, 0), row("/in/b.jpg", OK, 1)], "run1")
    manifest.append([row("/in/a.jpg", OK, 2)], "run2")
    table, journal = manifest.read()
    assert len(journal) == 2
    assert sorted(zip(table.column("input").to_pylist(), table.column("status").to_pylist(), strict=True)) == [
        ("/in/a.jpg", OK), ("/in/b.jpg", OK)
    ]  # fmt: skip
    compacted = manifest.compact()
    assert compacted.num_rows == 2 and manifest.journal_files() == []
    assert pq.read_table(tmp_path / "manifest.parquet").num_rows == 2  # readable by anyone
    # killed between compaction and deleting the journal: the same rows twice are one row each
    manifest.append([row("/in/b.jpg", OK, 1)], "run2")
    assert manifest.read()[0].num_rows == 2


def test_latest_per_input_breaks_ties_by_reading_order():
    table = rows_table([row("/a", ERROR, 5), row("/a", REJECTED, 5), row("/b", OK, 0)])
    kept = latest_per_input(table)
    assert kept.to_pydict()["status"] == [REJECTED, OK]


def test_errors_are_rejected_when_the_service_would_answer_4xx():
    from serve_app.images import ImageInputError
    from serve_app.limits import LimitExceededError

    assert classify(ImageInputError("a.jpg: not an image", 415)) == (REJECTED, "a.jpg: not an image")
    assert classify(LimitExceededError("max_faces_per_image", 8, 9, "too many faces"))[0] == REJECTED
    assert classify(RuntimeError("CUDA out of memory")) == (ERROR, "RuntimeError: CUDA out of memory")
    assert classify(FileNotFoundError("gone"))[0] == ERROR


def test_outputs_option():
    assert parse_outputs("json, image") == ("image", "json")
    with pytest.raises(ValueError, match="unknown video"):
        parse_outputs("image,video")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"steps": 101}, "max_steps"),
        ({"sampler_name": "nope"}, "sampler_name: unsupported 'nope'"),
        ({"model": "sdxl"}, "model: unknown 'sdxl'"),
        ({"use_segm": True}, "use_segm: the config has no segm detector"),
        ({"controlnet": {"name": "depth"}}, "controlnet.name: unknown 'depth'"),
        ({"denoise": 2}, "denoise"),
        ({"positive": "a <lora:../../x:1> face"}, "LoRA name '../../x' is refused"),
        ({"positive": "embedding:foo, a face"}, "embeddings are not supported"),
        ({"negative": "x" * 20_001}, "max_prompt_chars"),
    ],
)
def test_what_the_ingress_refuses_stops_the_job_before_it_starts(values: dict, message: str):
    with pytest.raises(BatchConfigError, match=message):
        plan_job(CONFIGS / "local-cpu.yaml", (), (), values, None, None, None, "image")


def test_a_plan_loads_only_the_models_the_parameters_pick(tmp_path: Path):
    (tmp_path / "params.json").write_text(json.dumps({"model": "tiny-alt", "use_sam": True, "steps": 3}))
    plan = plan_job(CONFIGS / "local-cpu.yaml", (), (), {"steps": 4}, tmp_path / "params.json", None, None, "image")
    assert plan.params.steps == 4 and plan.checkpoint_name == "tiny-alt"
    assert plan.sam is not None and plan.segm_detector is None and plan.controlnets is None
    assert plan.fingerprint["models"]["inpainter"] == "tiny://sd_alt/pipeline"
    with pytest.raises(BatchConfigError, match="either --params or --workflow"):
        plan_job(CONFIGS / "local-cpu.yaml", (), (), None, tmp_path / "params.json", tmp_path / "w.json", None, "image")


def test_resume_skips_recorded_inputs_and_redoes_missing_outputs_and_unrecorded_ones(tmp_path: Path):
    from serve_app.batch.job import _pending

    for name in ("a", "b", "c", "d", "e"):
        touch(tmp_path / "in" / f"{name}.jpg")
    output = resolve(str(tmp_path / "out"))
    listing = list_inputs(str(tmp_path / "in"))
    source = {item.key: item.input for item in listing.files}
    touch(tmp_path / "out" / "a.png")  # recorded, present
    touch(tmp_path / "out" / "d.png")  # committed, but the run died before its row
    Manifest(output).append(
        [
            row(source["a"], OK),
            row(source["b"], OK),  # recorded, but its output went missing since
            row(source["c"], REJECTED, outputs=[]),  # refused: not tried again
            row(source["e"], ERROR, outputs=[]),  # failed: tried again
        ],
        "run1",
    )
    todo, done = _pending(listing, Manifest(output), output)
    assert [item.key for item in todo] == ["b", "d", "e"]
    assert [item.key for item in done] == ["a", "c"]


def test_the_cli_exits_2_before_any_work_when_the_job_cannot_run(tmp_path: Path, capsys):
    from serve_app.cli import main

    touch(tmp_path / "in" / "a.jpg")
    for argv, message in (
        (["--param", "steps=1000"], "steps: 1000 exceeds limits.max_steps"),
        (["--outputs", "image,video"], "unknown video"),
        (["--set", "inpainter.max_batch_size=0"], "max_batch_size"),
    ):
        with pytest.raises(SystemExit) as stopped:
            main(["batch", str(tmp_path / "in"), str(tmp_path / "out"), *argv])
        assert stopped.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:  # OUTPUT must not contain INPUT
        main(["batch", str(tmp_path / "in"), str(tmp_path)])
    assert stopped.value.code == 2 and "must not be INPUT or contain it" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
