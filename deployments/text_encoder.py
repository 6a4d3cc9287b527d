"""Text encoding for SD3 and Flux checkpoints, shared by every inpainter replica (its own Serve deployment).

T5-XXL alone is 4.8 GB in fp8 and 9.5 GB in fp16, more than the SD 1.5 UNet: copied into every
inpainter replica it would take the room of replicas that sample. So, when the application
configures ``text_encoder``, the inpainter loads an SD3/Flux checkpoint without its text
encoders (:func:`~deployments.families.loading.load_family`'s ``text_encoding``) and asks this
deployment for each prompt's conditioning. SD 1.x/2.x/XL keep their CLIP encoders in the
inpainter: they are small, and LoRAs patch them.

:class:`TextEncoder` loads, per distinct set of text encoders (the *encoder identity*: family
and the references of the encoder files or the checkpoint holding them, so two checkpoints with
the same ``clip_l``/``t5xxl`` files share one copy and one cache), the tokenizers and encoders
only, and runs the family's own prompt encoder (:mod:`deployments.families`) on them: the
conditioning is exactly what the inpainter would compute with its own encoders in the same dtype
on the same device. Results are kept in a :class:`~deployments.prompt_cache.PromptEmbeddingCache`
keyed by (encoder identity, prompt chunks); its hits and misses are in ``GET /v1/stats``.

:class:`SharedTextEncoding` is the inpainter's side: the prompt encoder it hands a family, which
calls the deployment (or, in-process, a :class:`TextEncoder`) and moves the result to the
inpainter's device and dtype.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from deployments.families.base import PromptEncoder, TextConditioning, encoder_tokenizers
from deployments.families.loading import (
    FOLDER_TEXT_ENCODERS,
    CheckpointSource,
    TextEncoderParts,
    load_text_encoders,
    public_reference,
)
from deployments.inpainter_loading import pick_device, pick_dtype
from deployments.prompt_cache import PromptEmbeddingCache

__all__ = ["SHARED_FAMILIES", "SharedTextEncoding", "TextEncoder", "TextEncoderClient", "encoder_identity", "source_of"]

SHARED_FAMILIES = ("sd3", "flux")  # the families whose text encoding this deployment serves


def source_of(spec: Mapping[str, Any]) -> CheckpointSource:
    """A configured checkpoint (``checkpoint_specs``' form) as a :class:`CheckpointSource`."""
    options = {key: value for key, value in spec.items() if value is not None}
    options["config"] = options.pop("single_file_config", None)
    options["text_encoders"] = dict(options.get("text_encoders") or {})
    return CheckpointSource(**options)


def encoder_identity(source: CheckpointSource) -> str:
    """What a checkpoint's text conditioning depends on, as a stable string (cache key and sharing key).

    Split layout: the family override, the config folder and the encoder files (the diffusion
    model is not part of it); otherwise the checkpoint (folder or single file) holding them.
    """
    if source.diffusion_model is not None:
        files = ",".join(f"{name}={reference}" for name, reference in sorted(source.text_encoders.items()))
        return f"split[{source.family or ''}|{source.config}|{files}]"
    return f"model[{source.family or ''}|{source.model}|{source.config}]"


def _public_identity(source: CheckpointSource) -> str:
    if source.diffusion_model is not None:
        files = ",".join(
            f"{name}={public_reference(reference)}" for name, reference in sorted(source.text_encoders.items())
        )
        return f"split[{source.family or ''}|{public_reference(source.config)}|{files}]"
    return f"model[{source.family or ''}|{public_reference(source.model)}|{public_reference(source.config)}]"


class _LoadedEncoders:
    """One encoder identity's prompt encoder and its counters."""

    def __init__(self, parts: TextEncoderParts, encoder: PromptEncoder, load_seconds: float) -> None:
        self.parts, self.encoder, self.load_seconds = parts, encoder, load_seconds
        self.checkpoints: list[str] = []
        self.encodes = 0
        self.encode_seconds = 0.0

    def parameter_bytes(self) -> int:
        return sum(
            tensor.numel() * tensor.element_size()
            for model in self.parts.encoders.values()
            for tensor in [*model.parameters(), *model.buffers()]
        )


class TextEncoder:
    """The text encoders of the configured SD3/Flux checkpoints, loaded on first use, with a prompt cache.

    ``checkpoints`` are the inpainter's (``{name: spec}``, :func:`deployments.checkpoints.checkpoint_specs`);
    :meth:`encode` answers for the SD3/Flux ones. ``dtype``/``device`` should be the inpainter's
    for its conditioning to be bit-identical to local encoding (the inpainter casts to its dtype
    in any case). ``preload`` loads every SD3/Flux checkpoint's encoders at start (its family is
    read from the files' headers).
    """

    def __init__(
        self,
        checkpoints: str | Mapping[str, Any],
        *,
        device: str | None = None,
        dtype: str | None = None,
        cache_dir: str | None = None,
        cache_max_entries: int = 1024,
        cache_max_bytes: int = 512 * 1024 * 1024,
        preload: bool = False,
    ) -> None:
        from deployments.checkpoints import checkpoint_specs  # (it imports the inpainter, which imports this)

        self.sources = {name: source_of(spec) for name, spec in checkpoint_specs(checkpoints).items()}
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.cache = PromptEmbeddingCache(max_entries=cache_max_entries, max_bytes=cache_max_bytes)
        self._loaded: dict[str, _LoadedEncoders] = {}
        self._load_lock = threading.Lock()
        self._encode_lock = threading.Lock()  # one encoder call at a time: the device is the limit
        if preload:
            from deployments.families.loading import describe_checkpoint

            for name, source in self.sources.items():
                spec = {"single_file_config": source.config, **{
                    key: getattr(source, key) for key in ("model", "diffusion_model", "text_encoders", "vae", "family")
                }}  # fmt: skip
                if describe_checkpoint(spec, self.cache_dir).get("family") in SHARED_FAMILIES:
                    self.encoder(name)

    def identity(self, checkpoint: str) -> str:
        return encoder_identity(self._source(checkpoint))

    def _source(self, checkpoint: str) -> CheckpointSource:
        source = self.sources.get(checkpoint)
        if source is None:
            raise ValueError(f"text encoder: unknown checkpoint {checkpoint!r}; configured: {', '.join(self.sources)}")
        return source

    def encoder(self, checkpoint: str) -> _LoadedEncoders:
        """The checkpoint's encoders, loaded once per encoder identity."""
        source = self._source(checkpoint)
        identity = encoder_identity(source)
        with self._load_lock:
            loaded = self._loaded.get(identity)
            if loaded is None:
                started = time.perf_counter()
                parts = load_text_encoders(source, dtype=self.dtype, cache_dir=self.cache_dir)
                for model in parts.encoders.values():
                    model.to(self.device).eval().requires_grad_(False)
                loaded = _LoadedEncoders(parts, self._prompt_encoder(parts), time.perf_counter() - started)
                self._loaded[identity] = loaded
            if checkpoint not in loaded.checkpoints:
                loaded.checkpoints.append(checkpoint)
        return loaded

    def _prompt_encoder(self, parts: TextEncoderParts) -> PromptEncoder:
        if parts.family == "flux":
            from deployments.families.flux import flux_prompt_encoder

            return flux_prompt_encoder(parts.tokenizers, parts.encoders, device=self.device, dtype=self.dtype)
        from deployments.families.sd3 import sd3_prompt_encoder

        return sd3_prompt_encoder(
            parts.tokenizers, parts.encoders, parts.transformer_config, device=self.device, dtype=self.dtype
        )

    def encode(self, checkpoint: str, chunks: tuple[str, ...] | list[str]) -> TextConditioning:
        """The conditioning of a prompt's chunks for ``checkpoint`` (tensors on the CPU), from the cache if there."""
        chunks = tuple(chunks) or ("",)
        identity = self.identity(checkpoint)
        key = (identity, chunks)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        loaded = self.encoder(checkpoint)
        with self._encode_lock:
            started = time.perf_counter()
            encoded = loaded.encoder.encode(chunks)
            loaded.encode_seconds += time.perf_counter() - started
            loaded.encodes += 1
        value = TextConditioning(
            encoded.context.cpu(), encoded.pooled.cpu() if encoded.pooled is not None else None
        )
        self.cache.put(key, value)
        return value

    def prompt_tokenizers(self, checkpoint: str) -> list[tuple[Any, int]]:
        """The checkpoint's tokenizers and window lengths (the ingress counts prompt tokens with them)."""
        return encoder_tokenizers(self.encoder(checkpoint).encoder)

    def stats(self) -> dict[str, Any]:
        """The prompt cache's counters and each loaded encoder set's encodes (this replica)."""
        return {
            **self.cache.stats(),
            "encoders": {
                _public_identity(self._source(loaded.checkpoints[0])): {
                    "family": loaded.parts.family,
                    "checkpoints": list(loaded.checkpoints),
                    "encodes": loaded.encodes,
                    "encode_s": round(loaded.encode_seconds, 4),
                }
                for loaded in list(self._loaded.values())
            },
        }

    def info(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "checkpoints": list(self.sources),
            "loaded": {
                _public_identity(self._source(loaded.checkpoints[0])): {
                    "family": loaded.parts.family,
                    "text_encoders": sorted(loaded.parts.encoders),
                    "checkpoints": list(loaded.checkpoints),
                    "weight_bytes": loaded.parameter_bytes(),
                    "load_seconds": round(loaded.load_seconds, 3),
                }
                for loaded in list(self._loaded.values())
            },
            "cache": self.cache.stats(),
        }

    def check_health(self) -> None:
        for loaded in list(self._loaded.values()):
            for model in loaded.parts.encoders.values():
                weight = next(iter(model.parameters()), None)
                if weight is not None and not torch.isfinite(weight.float()).all():
                    raise RuntimeError("text encoder weights are not finite")


class TextEncoderClient:
    """One checkpoint's view of the shared text encoder: its prompts' conditioning and its tokenizers.

    :meth:`remote` calls the :class:`~deployments.serving.TextEncoderDeployment` through its handle
    (blocking: from the engine's thread or a worker thread, never the replica's event loop);
    :meth:`local` a :class:`TextEncoder` in the same process (tests, benchmarks).
    """

    def __init__(
        self,
        encode: Callable[[tuple[str, ...]], TextConditioning],
        tokenizers: Callable[[], list[tuple[Any, int]]],
    ) -> None:
        self.encode, self.tokenizers = encode, tokenizers

    @classmethod
    def local(cls, service: TextEncoder, checkpoint: str) -> TextEncoderClient:
        return cls(lambda chunks: service.encode(checkpoint, chunks), lambda: service.prompt_tokenizers(checkpoint))

    @classmethod
    def remote(cls, handle: Any, checkpoint: str, timeout_s: float = 600.0) -> TextEncoderClient:
        def encode(chunks: tuple[str, ...]) -> TextConditioning:
            return handle.encode.remote(checkpoint, list(chunks)).result(timeout_s=timeout_s)

        def tokenizers() -> list[tuple[Any, int]]:
            return handle.prompt_tokenizers.remote(checkpoint).result(timeout_s=timeout_s)

        return cls(encode, tokenizers)


class SharedTextEncoding:
    """The inpainter's side: for an SD3/Flux checkpoint, a prompt encoder that asks the shared text encoder.

    ``client`` answers for one checkpoint (:class:`TextEncoderClient`); the conditioning is moved
    to ``device`` and ``dtype``. Called with a family by
    :func:`~deployments.families.loading.load_family`: None for the families that keep their own
    encoders.
    """

    def __init__(
        self,
        client: TextEncoderClient,
        *,
        device: torch.device,
        dtype: torch.dtype,
        names: tuple[str, ...] | None = None,
    ) -> None:
        self.client, self.device, self.dtype, self.names = client, device, dtype, names

    def __call__(self, family: str) -> PromptEncoder | None:
        if family not in SHARED_FAMILIES:
            return None
        names = self.names or tuple(FOLDER_TEXT_ENCODERS[family].values())
        return _RemotePromptEncoder(self.client, device=self.device, dtype=self.dtype, names=names)


class _RemotePromptEncoder(PromptEncoder):
    def __init__(
        self, client: TextEncoderClient, *, device: torch.device, dtype: torch.dtype, names: tuple[str, ...]
    ) -> None:
        self.client, self.device, self.dtype, self.names = client, device, dtype, tuple(sorted(names))
        self._tokenizers: list[tuple[Any, int]] | None = None

    def prompt_tokenizers(self) -> list[tuple[Any, int]]:
        """The shared encoder's tokenizers, asked once (a blocking call: not from an event loop)."""
        if self._tokenizers is None:
            self._tokenizers = list(self.client.tokenizers())
        return self._tokenizers

    def encode(self, chunks: tuple[str, ...]) -> TextConditioning:
        context, pooled = self.client.encode(tuple(chunks))
        return TextConditioning(
            context.to(self.device, self.dtype), pooled.to(self.device, self.dtype) if pooled is not None else None
        )
