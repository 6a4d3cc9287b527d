"""A bulk job: every input of a folder, glob, list or bucket detailed on Ray Data, resumable.

:func:`run_batch` (and ``facedetailer batch``) checks everything that can be checked before any
model work — the config, the parameters against the config's models and limits, INPUT and
OUTPUT — then lists the inputs, leaves out those the manifest already has, streams the rest
through :mod:`serve_app.batch.stages` on Ray Data, and compacts the manifest. See
``docs/batch.md``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from serve_app.batch.inputs import InputFile, InputListing, list_inputs
from serve_app.batch.manifest import DONE, ERROR, JOURNAL_DIR, OK, REJECTED, STATE_DIR, Manifest, new_run_id, now_utc
from serve_app.batch.outputs import DEFAULT_OUTPUTS, parse_outputs
from serve_app.batch.storage import Location, StorageError, list_files, remove_partial_files, resolve, write_atomic

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "local-cpu.yaml"
JOB_FILE = f"{STATE_DIR}/job.json"
IMAGES_PER_BATCH = 4  # images per Ray Data batch in the model stages
REFINE_BATCHES_IN_FLIGHT = 4  # batches one refine actor works on at once (all feed one engine)
TASK_CPUS = 0.25  # read and write tasks: decoding, PNG encoding, I/O

EXIT_OK, EXIT_SOME_FAILED, EXIT_INVALID = 0, 1, 2


class BatchConfigError(ValueError):
    """The job cannot start: a bad config, parameters, INPUT or OUTPUT (the CLI exits with 2)."""


@dataclass
class BatchSummary:
    """What a run did; ``exit_code`` is 0 when every input is done without error."""

    run_id: str
    inputs: int  # listed
    succeeded: int  # detailed in this run
    failed: int  # rejected or error in this run
    skipped: int  # done by an earlier run (in the manifest)
    rejected: int  # of failed: the input or its planned work was refused
    manifest: str
    output: str
    seconds: float
    faces_detected: int = 0
    faces_refined: int = 0
    failed_before: int = 0  # skipped inputs an earlier run rejected
    engine: dict[str, Any] = field(default_factory=dict)  # the refine actors' engine counters, summed
    errors: list[tuple[str, str]] = field(default_factory=list)  # (input, error), first few

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.failed or self.failed_before else EXIT_OK

    @property
    def images_per_s(self) -> float:
        return (self.succeeded + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        lines = [
            f"{self.inputs} inputs: {self.succeeded} succeeded, {self.failed} failed"
            f"{f' ({self.rejected} rejected)' if self.rejected else ''}, {self.skipped} skipped (done before"
            f"{f', {self.failed_before} of them failed' if self.failed_before else ''})",
            f"{self.faces_refined} faces refined of {self.faces_detected} detected in {self.seconds:.1f} s"
            f" ({self.images_per_s:.2f} images/s)",
        ]
        sizes = self.engine.get("unet_batch_sizes")
        if sizes:
            lines.append(f"UNet calls by crops per call: {sizes}")
        lines += [f"failed: {name}: {error}" for name, error in self.errors]
        lines.append(f"manifest: {self.manifest}")
        return lines


@dataclass
class JobPlan:
    """Everything the stages need, checked on the driver."""

    params: Any  # FaceDetailerParams
    app: Any  # AppArgs
    env_vars: dict[str, str]
    outputs: tuple[str, ...]
    detector: Any
    segm_detector: Any
    sam: Any
    checkpoint_name: str
    checkpoint: Any
    controlnets: dict[str, Any] | None
    control: Any
    fingerprint: dict[str, Any]


def run_batch(
    input: str,
    output: str,
    *,
    config: str | Path = DEFAULT_CONFIG,
    overlays: Sequence[str | Path] = (),
    sets: Sequence[str] = (),
    params: Mapping[str, Any] | None = None,
    params_file: str | Path | None = None,
    workflow: str | Path | None = None,
    workflow_node: str | None = None,
    resume: bool = True,
    outputs: str | Sequence[str] = DEFAULT_OUTPUTS,
    address: str | None = None,
    batch_size: int = IMAGES_PER_BATCH,
    progress: bool = True,
    input_filesystem: pafs.FileSystem | None = None,
    output_filesystem: pafs.FileSystem | None = None,
    log: Callable[[str], None] | None = None,
) -> BatchSummary:
    """Detail every image of ``input`` into ``output`` on Ray Data; see ``facedetailer batch --help``.

    ``params`` are FaceDetailer's inputs by name; they override ``params_file`` (a JSON object),
    which may not be combined with ``workflow`` (a ComfyUI workflow whose FaceDetailer node gives
    them). ``config``/``overlays``/``sets`` are those of ``facedetailer serve``. Ray: the running
    instance if this process is connected, else ``address`` (``auto``, ``ray://…``, host:port;
    default ``RAY_ADDRESS``, else a new local instance, shut down at the end).
    Raises :class:`BatchConfigError` before any work when the job cannot run.
    """
    say = log or (lambda text: print(text, file=sys.stderr))
    started = time.perf_counter()
    plan = plan_job(config, overlays, sets, params, params_file, workflow, workflow_node, outputs)
    output_location = _resolve(output, output_filesystem, "OUTPUT")
    try:
        listing = list_inputs(input, exclude=output_location, filesystem=input_filesystem)
    except (StorageError, OSError) as error:
        raise BatchConfigError(f"INPUT: {error}") from error
    _check_not_nested(input, input_filesystem, output_location)
    if not listing.files:
        raise BatchConfigError(f"INPUT: {input} has no image (.png, .jpg, .jpeg, .webp)")
    manifest = Manifest(output_location)
    _start_job(output_location, manifest, plan.fingerprint, resume, input)
    run_id = new_run_id()
    removed = remove_partial_files(output_location)
    if removed:
        say(f"removed {removed} temporary file(s) of an interrupted run")
    todo, done = _pending(listing, manifest, output_location)
    say(f"{len(listing.files)} inputs ({listing.kind}); {len(done)} done before, {len(todo)} to detail")
    counts = {OK: 0, REJECTED: 0, ERROR: 0}
    faces = [0, 0]
    errors: list[tuple[str, str]] = []
    engine: dict[str, Any] = {}
    try:
        if todo:
            for row in _execute(plan, todo, listing, output_location, run_id, address, batch_size, progress, engine):
                counts[row["status"]] += 1
                faces[0] += row["faces_detected"] or 0
                faces[1] += row["faces_refined"] or 0
                if row["status"] != OK and len(errors) < 10:
                    errors.append((row["input"], row["error"]))
    finally:
        table = manifest.compact()  # also after a failure or Ctrl-C: what was journaled is kept
    statuses = dict(zip(table.column("input").to_pylist(), table.column("status").to_pylist(), strict=True))
    failed_before = sum(1 for item in done if statuses.get(item.input) in (REJECTED, ERROR))
    summary = BatchSummary(
        run_id=run_id,
        inputs=len(listing.files),
        succeeded=counts[OK],
        failed=counts[REJECTED] + counts[ERROR],
        skipped=len(done),
        rejected=counts[REJECTED],
        manifest=output_location.display(manifest.path),
        output=output_location.uri,
        seconds=time.perf_counter() - started,
        faces_detected=faces[0],
        faces_refined=faces[1],
        failed_before=failed_before,
        engine=engine,
        errors=errors,
    )
    _finish_job(output_location, summary)
    return summary


# ---------------------------------------------------------------------------------- checks


def load_app_config(
    config: str | Path, overlays: Sequence[str | Path] = (), sets: Sequence[str] = ()
) -> tuple[Any, dict[str, str]]:
    """(AppArgs, runtime env vars) of the config's facedetailer application, overlays applied."""
    from serve_app.app import APP_NAME, app_args_from_config, load_serve_config
    from serve_app.overlay import OverlayError, apply_overlays, validate_config

    try:
        document = apply_overlays(load_serve_config(config), overlays, sets)
        validate_config(document)
        app = app_args_from_config(document)
    except (OverlayError, ValueError, KeyError, OSError) as error:
        raise BatchConfigError(f"{config}: {error}") from error
    application = next(item for item in document["applications"] if item.get("name") == APP_NAME)
    env = application.get("runtime_env", {}).get("env_vars", {})
    return app, {key: str(value) for key, value in env.items()}


def job_params(
    params: Mapping[str, Any] | None,
    params_file: str | Path | None,
    workflow: str | Path | None,
    workflow_node: str | None,
) -> Any:
    """FaceDetailerParams from a workflow or a JSON file, overridden by ``params``."""
    from pydantic import ValidationError

    from facedetailer.params import FaceDetailerParams
    from facedetailer.workflow import WorkflowError, import_workflow

    if params_file is not None and workflow is not None:
        raise BatchConfigError("give either --params or --workflow, not both")
    values: dict[str, Any] = {}
    try:
        if workflow is not None:
            values.update(import_workflow(Path(workflow).read_text(encoding="utf-8"), workflow_node).params)
        elif params_file is not None:
            loaded = json.loads(Path(params_file).read_text(encoding="utf-8"))
            if not isinstance(loaded, dict):
                raise BatchConfigError(f"{params_file}: must hold a JSON object of parameters")
            values.update(loaded)
    except (OSError, ValueError, WorkflowError) as error:
        if isinstance(error, BatchConfigError):
            raise
        raise BatchConfigError(f"{workflow or params_file}: {error}") from error
    values.update(params or {})
    try:
        return FaceDetailerParams.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'params'}: {item['msg']}"
            for item in error.errors(include_url=False)
        )
        raise BatchConfigError(f"invalid parameters: {problems}") from error


def plan_job(
    config: str | Path,
    overlays: Sequence[str | Path],
    sets: Sequence[str],
    params: Mapping[str, Any] | None,
    params_file: str | Path | None,
    workflow: str | Path | None,
    workflow_node: str | None,
    outputs: str | Sequence[str],
) -> JobPlan:
    """The checks the ingress makes before any model work, once for the whole job."""
    from deployments.inpainter_hooks import check_cycle_plan
    from deployments.sampling import SAMPLER_NAMES, SCHEDULER_NAMES, validate
    from facedetailer.prompts import face_conditioning
    from facedetailer.safe_paths import check_name
    from facedetailer.wildcards import FacePrompt
    from serve_app.config import Limits
    from serve_app.images import decode_base64_image
    from serve_app.ingress import sampling_settings
    from serve_app.limits import LimitExceededError, check_request
    from serve_app.model_choice import ModelChoice, NamedModels
    from serve_app.pipeline import check_hooks, resolve_control

    app, env_vars = load_app_config(config, overlays, sets)
    values = job_params(params, params_file, workflow, workflow_node)
    try:
        kinds = parse_outputs(outputs)
        check_request(values, app.limits)
        check_hooks(values)
        models = ModelChoice.of(app.named_detectors(), app.named_segm_detectors(), app.named_sam_models())
        chosen = models.select(values)
        checkpoints = app.inpainter.named_checkpoints()
        checkpoint = NamedModels.of("model", checkpoints).resolve(values.model)
        name = next(key for key, spec in checkpoints.items() if spec is checkpoint)
        for field_name, value, supported in (
            ("sampler_name", values.sampler_name, SAMPLER_NAMES),
            ("scheduler", values.scheduler, SCHEDULER_NAMES),
        ):
            if value not in supported:
                raise BatchConfigError(f"{field_name}: unsupported {value!r}; supported: {', '.join(supported)}")
        settings = sampling_settings(values)
        validate(settings.sampler_name, settings.scheduler, settings.steps, settings.denoise)
        check_cycle_plan(settings)
        # the prompts' syntax and LoRA names, as the ingress's preflight (their tokens: in the refine actors)
        base = face_conditioning(values.positive, values.negative, FacePrompt(False, False, None, None, False))
        for lora in base.loras:
            check_name(lora.name, "LoRA")
        if values.use_sam and chosen.sam is None:
            raise BatchConfigError("use_sam: the config has no SAM model")
        if values.use_segm and chosen.segm_detector is None:
            raise BatchConfigError("use_segm: the config has no segm detector")
        configured = app.controlnets or {}
        control = resolve_control(
            values,
            {key: spec.preprocessor for key, spec in configured.items()},
            lambda text: decode_base64_image(text, Limits(), "controlnet.control_image"),
        )
    except BatchConfigError:
        raise
    except (LimitExceededError, ValueError) as error:  # model choice, names, samplers, hooks, ControlNet
        raise BatchConfigError(str(error)) from error
    controlnets = None
    if values.controlnet is not None:  # only the ControlNet the job uses is loaded
        controlnets = {values.controlnet.name: configured[values.controlnet.name].model_dump()}
    segm = chosen.segm_detector if values.use_segm and not values.use_sam else None  # SAM takes priority
    sam = chosen.sam if values.use_sam else None
    fingerprint = {
        "params": values.model_dump(mode="json"),
        "outputs": list(kinds),
        "models": {
            "detector": chosen.detector.model,
            "segm_detector": segm.model if segm is not None else None,
            "sam": sam.checkpoint if sam is not None else None,
            "inpainter": checkpoint.model,
            "controlnet": controlnets[values.controlnet.name]["model"] if controlnets else None,
        },
    }
    return JobPlan(
        params=values,
        app=app,
        env_vars=env_vars,
        outputs=kinds,
        detector=chosen.detector,
        segm_detector=segm,
        sam=sam,
        checkpoint_name=name,
        checkpoint=checkpoint,
        controlnets=controlnets,
        control=control,
        fingerprint=fingerprint,
    )


def _resolve(uri: str, filesystem: pafs.FileSystem | None, what: str) -> Location:
    try:
        return resolve(uri, filesystem)
    except StorageError as error:
        raise BatchConfigError(f"{what}: {error}") from error


def _check_not_nested(input: str, filesystem: pafs.FileSystem | None, output: Location) -> None:
    """OUTPUT inside INPUT is fine (it is left out of the listing); INPUT inside OUTPUT is not."""
    from serve_app.batch.inputs import _split_glob

    base = _resolve(_split_glob(str(input))[0], filesystem, "INPUT")
    if base.filesystem.type_name != output.filesystem.type_name:
        return
    if base.path == output.path or base.path.startswith(output.path.rstrip("/") + "/"):
        raise BatchConfigError(f"OUTPUT {output.uri} must not be INPUT or contain it")


def _start_job(output: Location, manifest: Manifest, fingerprint: dict[str, Any], resume: bool, input: str) -> None:
    """Resume only the same job: its parameters, outputs and models must be those of the manifest's rows."""
    filesystem, path = output.filesystem, output.join(JOB_FILE)
    previous = None
    if filesystem.get_file_info(path).type == pafs.FileType.File:
        with filesystem.open_input_stream(path) as stream:
            previous = json.loads(stream.read())
    if resume and previous is not None and previous.get("fingerprint") != fingerprint:
        changed = _differences(previous.get("fingerprint") or {}, fingerprint)
        raise BatchConfigError(
            f"OUTPUT {output.uri} holds a job with other settings ({'; '.join(changed[:8])}): resume it with the "
            "same ones, start it over with --no-resume, or write to another OUTPUT"
        )
    if not resume:
        manifest.reset()
    record = {
        "fingerprint": fingerprint,
        "input": input,
        "created_at": (previous or {}).get("created_at") if resume else None,
        "runs": ((previous or {}).get("runs", []) if resume else []),
    }
    record["created_at"] = record["created_at"] or now_utc().isoformat()
    write_atomic(filesystem, path, json.dumps(record, indent=1).encode())


def _finish_job(output: Location, summary: BatchSummary) -> None:
    filesystem, path = output.filesystem, output.join(JOB_FILE)
    with filesystem.open_input_stream(path) as stream:
        record = json.loads(stream.read())
    record["runs"] = [*record.get("runs", [])[-49:], {
        "run_id": summary.run_id, "finished_at": now_utc().isoformat(), "succeeded": summary.succeeded,
        "failed": summary.failed, "skipped": summary.skipped, "seconds": round(summary.seconds, 3),
        "unet_batch_sizes": summary.engine.get("unet_batch_sizes", {}),
    }]  # fmt: skip
    write_atomic(filesystem, path, json.dumps(record, indent=1).encode())


def _differences(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key}: {json.dumps(old)} → {json.dumps(new)}")
    return changed


def _pending(listing: InputListing, manifest: Manifest, output: Location) -> tuple[list[InputFile], list[InputFile]]:
    """(to detail, done before): done = a row that is ok with every output present, or rejected."""
    table, _ = manifest.read()
    if table.num_rows == 0:
        return list(listing.files), []
    present = {
        info.path[len(output.path) :].lstrip("/")
        for info in list_files(output)
        if not info.path.startswith(output.join(JOURNAL_DIR))
    }
    rows = {row["input"]: row for row in table.select(["input", "status", "outputs"]).to_pylist()}
    todo, done = [], []
    for item in listing.files:
        row = rows.get(item.input)
        finished = row is not None and row["status"] in DONE
        if finished and row["status"] == OK and not all(name in present for name in row["outputs"] or []):
            finished = False  # an output went missing since: detail it again
        (done if finished else todo).append(item)
    return todo, done


# ---------------------------------------------------------------------------------- Ray Data


def _pool(options: Any) -> dict[str, Any]:
    """Actor pool size from a deployment's options: its replicas, or its autoscaling bounds."""
    if options.num_replicas is not None:
        return {"size": options.num_replicas}
    if options.autoscaling_config is not None:
        scaling = options.autoscaling_config
        low = max(1, scaling.initial_replicas or scaling.min_replicas)
        return {"min_size": max(1, scaling.min_replicas), "max_size": max(low, scaling.max_replicas)}
    return {"size": 1}


def _read_tasks(detector_pool: dict[str, int]) -> int:
    """Concurrent read tasks: twice the detectors, at least 4.

    Never the detector pool's size: Ray Data fuses a task stage into the next actor stage when
    their remote args agree and the task pool's size is unset or that actor pool's maximum —
    reading would then run inside the detector's actors, one image at a time (and in a process
    where ultralytics has patched PIL's image opener).
    """
    most = detector_pool.get("size") or detector_pool["max_size"]
    return max(4, 2 * most)


def _actor_resources(*options: Any) -> dict[str, Any]:
    """num_cpus / num_gpus / memory / resources summed over the deployments one actor stands for."""
    cpus = sum(item.ray_actor_options.num_cpus for item in options)
    gpus = sum(item.ray_actor_options.num_gpus for item in options)
    memory = sum(item.ray_actor_options.memory or 0 for item in options)
    resources: dict[str, float] = {}
    for item in options:
        for name, amount in (item.ray_actor_options.resources or {}).items():
            resources[name] = resources.get(name, 0.0) + amount
    found: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
    if memory:
        found["memory"] = memory
    if resources:
        found["resources"] = resources
    return found


def _execute(
    plan: JobPlan,
    todo: list[InputFile],
    listing: InputListing,
    output: Location,
    run_id: str,
    address: str | None,
    batch_size: int,
    progress: bool,
    engine: dict[str, Any],
) -> Any:
    """Stream ``todo`` through the stages; yield each manifest row as its batch is written."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    from deployments.engine_stats import EngineStatsAggregator
    from serve_app.batch import stages

    started_ray = False
    if not ray.is_initialized():
        ray.init(
            address=address or os.environ.get("RAY_ADDRESS") or "local",
            runtime_env={"env_vars": plan.env_vars},
            include_dashboard=False,
            log_to_driver=False,
        )
        started_ray = True
    aggregator = None
    try:
        context = DataContext.get_current()
        context.enable_progress_bars = progress
        context.execution_options.preserve_order = False
        runtime_env = {"env_vars": plan.env_vars}
        aggregator = ray.remote(num_cpus=0)(EngineStatsAggregator).remote()
        app, params = plan.app, plan.params
        detector_pool = _pool(plan.detector.deployment)
        items = [
            {"input": item.input, "key": item.key, "path": item.path, "source": item.source, "size": item.size}
            for item in todo
        ]
        blocks = max(1, min(len(items), 200, -(-len(items) // batch_size)))
        dataset = ray.data.from_items(items, override_num_blocks=blocks)
        dataset = dataset.map_batches(
            stages.read_images,
            fn_kwargs={"filesystems": listing.filesystems, "limits": app.limits},
            batch_size=batch_size,
            batch_format="pyarrow",
            num_cpus=TASK_CPUS,
            runtime_env=runtime_env,
            compute=TaskPoolStrategy(size=_read_tasks(detector_pool)),
        )
        detector_options = [plan.detector.deployment] + ([plan.segm_detector.deployment] if plan.segm_detector else [])
        dataset = dataset.map_batches(
            stages.DetectFaces,
            fn_constructor_kwargs={
                "detector": plan.detector,
                "segm_detector": plan.segm_detector,
                "threshold": params.bbox_threshold,
            },
            compute=ActorPoolStrategy(**detector_pool),
            batch_size=batch_size,
            batch_format="pyarrow",
            runtime_env=runtime_env,
            **_actor_resources(*detector_options),
        )
        has_segm = plan.segm_detector is not None
        if plan.sam is not None:
            dataset = dataset.map_batches(
                stages.SegmentFaces,
                fn_constructor_kwargs={
                    "sam": plan.sam,
                    "params": params,
                    "limits": app.limits,
                    "wildcards_dir": app.wildcards_dir,
                    "has_segm": has_segm,
                },
                compute=ActorPoolStrategy(**_pool(plan.sam.deployment)),
                batch_size=batch_size,
                batch_format="pyarrow",
                runtime_env=runtime_env,
                **_actor_resources(plan.sam.deployment),
            )
        inpainter = app.inpainter
        dataset = dataset.map_batches(
            stages.RefineFaces,
            fn_constructor_kwargs={
                "checkpoint_name": plan.checkpoint_name,
                "checkpoint": plan.checkpoint,
                "inpainter": inpainter,
                "controlnets": plan.controlnets,
                "params": params,
                "limits": app.limits,
                "wildcards_dir": app.wildcards_dir,
                "has_segm": has_segm,
                "control": plan.control,
                "stats": aggregator,
            },
            compute=ActorPoolStrategy(
                **_pool(inpainter.deployment), max_concurrent_calls_per_actor=REFINE_BATCHES_IN_FLIGHT
            ),
            batch_size=batch_size,
            batch_format="pyarrow",
            runtime_env=runtime_env,
            **_actor_resources(inpainter.deployment),
        )
        dataset = dataset.map_batches(
            stages.write_outputs,
            fn_kwargs={"output": output, "outputs": plan.outputs, "run_id": run_id},
            batch_size=batch_size,
            batch_format="pyarrow",
            num_cpus=TASK_CPUS,
            runtime_env=runtime_env,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from batch.select(["input", "status", "error", "faces_detected", "faces_refined"]).to_pylist()
        engine.update(ray.get(aggregator.summary.remote(), timeout=30))
    finally:
        if aggregator is not None:
            ray.kill(aggregator)
        if started_ray:
            ray.shutdown()
