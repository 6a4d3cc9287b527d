"""A bulk job on a real S3 API (moto's server on a loopback port), killed mid-run and resumed.

INPUT and OUTPUT are buckets. The job runs as ``facedetailer batch`` in a subprocess (its own
local Ray); once some images are done the test SIGKILLs the driver, checks that the driver's Ray
went down with it, and runs the same command again. Versioning is on in the output bucket, so
every PUT of an output is visible afterwards: each output must hold one content (a redone
image's outputs are the same bytes), an image the first run recorded must not be redone, and
nothing but the recorded outputs, the manifest and the job file may be left in the bucket.
The models are ``sim://`` stand-ins (a sleeping UNet), so the run lasts long enough to be
interrupted without costing CPU.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.cluster.harness import free_port, sample_image, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
IMAGES = 12
CORRUPT = "photos/broken.png"
SIM_SETS = [
    "inpainter.checkpoints=null",
    "inpainter.model=sim://sd15-inpainting?a=0.15&b=0",  # 0.15 s per UNet call, whatever the batch
    "controlnets=null",
    "detector.model=sim://detector?faces=1",
]
PARAMS = ["--param", "steps=6", "--param", "guide_size=128", "--param", "max_size=256"]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port; the AWS variables point at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true",
    }  # fmt: skip
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def s3_client(env: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")


def batch_command(*extra: str) -> list[str]:
    return [
        sys.executable, "-m", "serve_app.cli", "batch", "s3://inputs/photos", "s3://results/run", "--no-progress",
        "--batch-size", "1", *PARAMS, *[item for value in SIM_SETS for item in ("--set", value)], *extra,
    ]  # fmt: skip


def group_members(pgid: int) -> list[int]:
    """Live processes (not zombies) of a process group: the killed driver's Ray, if any is left."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def test_a_job_on_s3_killed_mid_run_resumes_and_writes_every_output_exactly_once(s3, tmp_path: Path):
    client = s3_client(s3)
    client.create_bucket(Bucket="inputs")
    client.create_bucket(Bucket="results")
    client.put_bucket_versioning(Bucket="results", VersioningConfiguration={"Status": "Enabled"})
    for index in range(IMAGES):
        client.put_object(Bucket="inputs", Key=f"photos/img-{index:02d}.png", Body=sample_image(index))
    truncated = sample_image(99)
    client.put_object(Bucket="inputs", Key=CORRUPT, Body=truncated[: len(truncated) // 2])
    client.put_object(Bucket="inputs", Key="photos/notes.txt", Body=b"not an input")

    def journal() -> list[str]:
        listed = client.list_objects_v2(Bucket="results", Prefix="run/.batch/journal/")
        return [item["Key"] for item in listed.get("Contents", [])]

    def versions() -> list[tuple[str, str]]:
        listed = client.list_object_versions(Bucket="results", Prefix="run/").get("Versions", [])
        return sorted((item["Key"], item["VersionId"]) for item in listed)

    # run 1: killed (SIGKILL, the driver only) once the first images are recorded
    log = open(tmp_path / "run1.log", "wb")
    first = subprocess.Popen(batch_command(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: len(journal()) >= 2 or first.poll() is not None, 300, 0.05, "run 1 records images")
        assert first.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        # its Ray shares its fate (GCS and raylet at once, then the workers): the writes stop
        snapshots = [versions()]

        def settled() -> bool:
            time.sleep(3)
            snapshots.append(versions())
            return snapshots[-1] == snapshots[-2]

        wait_until(settled, 60, 0.0, "no more writes after the driver was killed")
    finally:
        for pid in group_members(first.pid):  # Ray's agents linger a while: end them (this test started them)
            os.kill(pid, signal.SIGKILL)
        log.close()
    recorded_first = journal()
    assert recorded_first and not client.list_objects_v2(Bucket="results", Prefix="run/manifest.parquet").get(
        "Contents"
    )  # killed before compaction
    # run 2: the same command resumes (the default) and finishes
    second = subprocess.run(batch_command(), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert second.returncode == 1, second.stdout + second.stderr[-3000:]  # 1: the corrupt input failed
    summary = second.stdout
    body = client.get_object(Bucket="results", Key="run/manifest.parquet")["Body"].read()
    rows = pq.read_table(io.BytesIO(body)).to_pylist()
    inputs = [row["input"] for row in rows]
    assert len(inputs) == len(set(inputs)) == IMAGES + 1
    statuses = Counter(row["status"] for row in rows)
    assert statuses == {"ok": IMAGES, "rejected": 1}, rows
    [broken] = [row for row in rows if row["status"] == "rejected"]
    assert broken["input"] == f"s3://inputs/{CORRUPT}" and "corrupt or truncated" in broken["error"]
    runs = Counter(row["run_id"] for row in rows)
    assert len(runs) == 2, runs  # some rows from each run
    first_run = min(runs)  # run ids sort by start time
    done_first = runs[first_run]
    assert 0 < done_first < IMAGES + 1
    assert f"{done_first} skipped" in summary, summary  # resumed: what run 1 recorded was not redone
    # the bucket holds the recorded outputs, the manifest and the job file: no partial, stray or journal object
    expected = {f"run/{name}" for row in rows for name in row["outputs"]}
    assert len(expected) == IMAGES and all(name.endswith(".png") for name in expected)
    listed = {  # less pyarrow's empty folder markers ("run/.batch/journal/" once its last file is deleted)
        item["Key"]
        for item in client.list_objects_v2(Bucket="results", Prefix="run/")["Contents"]
        if not (item["Key"].endswith("/") and item["Size"] == 0)
    }
    assert listed == expected | {"run/manifest.parquet", "run/.batch/job.json"}
    # every output holds one content; the images the first run recorded were written once
    versions = client.list_object_versions(Bucket="results", Prefix="run/")["Versions"]
    etags: dict[str, set[str]] = {}
    puts: Counter[str] = Counter()
    for version in versions:
        etags.setdefault(version["Key"], set()).add(version["ETag"])
        puts[version["Key"]] += 1
    by_output = {f"run/{row['outputs'][0]}": row for row in rows if row["outputs"]}
    for key, row in by_output.items():
        assert len(etags[key]) == 1, (key, etags[key])
        if row["run_id"] == first_run:
            assert puts[key] == 1, (key, puts[key])
    redone = sum(1 for key, row in by_output.items() if puts[key] > 1)
    print(f"\nkilled after {done_first} of {IMAGES + 1} inputs were recorded; {redone} image(s) had their outputs "
          f"committed but not recorded and were redone with identical bytes")
