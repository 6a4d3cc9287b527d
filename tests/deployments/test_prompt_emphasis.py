"""Prompt emphasis in the inpainter's text encoding, as ComfyUI's ``encode_token_weights`` computes it.

The expected values are computed here from the tiny encoders' raw outputs (the windows written
out by hand, the empty prompt's window appended to the batch, ComfyUI's per-token rule
z' = (z − z_empty)·w + z_empty in float32), never through the inpainter's own helpers. Each BREAK
chunk is one encoder call, as Impact's one CLIPTextEncode per chunk + ConditioningConcat.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deployments.inpainter import Inpainter, RefineJob, SamplingSettings, _prompt_windows
from facedetailer.prompt_weights import PromptSyntaxError
from facedetailer.token_windows import token_windows

pytestmark = [pytest.mark.models, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

BOS, EOS = 49406, 49407
A, FACE, PHOTO = 320, 1710, 1125  # "a", "face", "photo" in CLIP's vocabulary


@pytest.fixture(scope="module")
def sd(tiny_sd: dict) -> Inpainter:
    return Inpainter(tiny_sd["pipeline"], device="cpu")


@pytest.fixture(scope="module")
def sdxl(tiny_sd: dict) -> Inpainter:
    return Inpainter(tiny_sd["sdxl_pipeline"], device="cpu")


def pad_of(tokenizer: object) -> int:
    pad = tokenizer.pad_token_id  # type: ignore[attr-defined]
    return pad if pad is not None else EOS


def window(tokenizer: object, ids: list[int]) -> list[int]:
    return [BOS, *ids, EOS] + [pad_of(tokenizer)] * (75 - len(ids))


def raw_hidden(inpainter: Inpainter, index: int, windows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encoder ``index``'s hidden states [n, 77, D] (the layer the inpainter uses) and pooled output."""
    encoder = inpainter.components.text_encoders[index]
    is_sdxl = inpainter.components.is_sdxl
    with torch.inference_mode():
        output = encoder(torch.tensor(windows), output_hidden_states=is_sdxl)
    hidden = output.hidden_states[-2] if is_sdxl else output.last_hidden_state
    return hidden.float(), getattr(output, "text_embeds", None)


def encode(inpainter: Inpainter, *chunks: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    with torch.inference_mode():
        return inpainter._encode_prompt(chunks)


def unweighted_reference(inpainter: Inpainter, chunks: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A plain prompt: each chunk is one group tokenized whole, cut into windows, one call per chunk."""
    parts, pooled = [], None
    for index, tokenizer in enumerate(inpainter.components.tokenizers):
        chunk_parts = []
        for chunk in chunks:
            ids = tokenizer(chunk, add_special_tokens=False).input_ids
            windows = token_windows([ids], start_token=BOS, end_token=EOS, pad_token=pad_of(tokenizer))
            hidden, text_embeds = raw_hidden(inpainter, index, windows)
            chunk_parts.append(hidden.reshape(1, -1, hidden.shape[-1]))
            if pooled is None and text_embeds is not None:
                pooled = text_embeds[:1]
        parts.append(torch.cat(chunk_parts, dim=1))
    return torch.cat(parts, dim=-1), pooled


def former_encoding(
    inpainter: Inpainter, chunks: tuple[str, ...], *, per_chunk: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An independent copy of the encoding as it was before one call per chunk (``per_chunk=False``:
    every chunk's windows and ONE empty window in one encoder call), or with one call per chunk."""
    parts, pooled = [], None
    for index, tokenizer in enumerate(inpainter.components.tokenizers):
        calls = [[chunk] for chunk in chunks] if per_chunk else [list(chunks)]
        call_parts = []
        for call in calls:
            windows, weights = [], []
            for chunk in call:
                chunk_windows, chunk_weights = _prompt_windows(tokenizer, chunk, 77)
                windows, weights = windows + chunk_windows, weights + chunk_weights
            emphasis = any(w != 1.0 for row in weights for w in row)
            hidden, text_embeds = raw_hidden(inpainter, index, windows + ([window(tokenizer, [])] if emphasis else []))
            if emphasis:
                z, z_empty, w = hidden[:-1], hidden[-1], torch.tensor(weights, dtype=torch.float32)[..., None]
                hidden = torch.where(w != 1.0, (z - z_empty) * w + z_empty, z)
            call_parts.append(hidden.reshape(1, -1, hidden.shape[-1]))
            if pooled is None and text_embeds is not None:
                pooled = text_embeds[:1]
        parts.append(torch.cat(call_parts, dim=1))
    return torch.cat(parts, dim=-1), pooled


def same(ours: tuple[torch.Tensor, torch.Tensor | None], expected: tuple[torch.Tensor, torch.Tensor | None]) -> bool:
    pooled, expected_pooled = ours[1], expected[1]
    same_pooled = pooled is None and expected_pooled is None or torch.equal(pooled, expected_pooled)
    return torch.equal(ours[0], expected[0].to(ours[0].dtype)) and same_pooled


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_prompts_without_emphasis_are_encoded_bit_for_bit_as_one_group_per_chunk(
    model: str, request: pytest.FixtureRequest
) -> None:
    inpainter = request.getfixturevalue(model)
    for chunks in [("a photo of a face, smiling",), ("a face", "photo BREAK-less"), (" ".join(["face"] * 100),), ("",)]:
        assert same(encode(inpainter, *chunks), unweighted_reference(inpainter, chunks)), chunks


SINGLE_CHUNKS = [
    "a (smiling:1.2) face, ((freckles))",
    " ".join(["a"] * 74) + " ((photo)) (face:0.5)",
    "(a:1.5) " * 50 + "plain " * 30,  # three windows
    "a photo of a face",
    "",
]
SEVERAL_CHUNKS = [
    ("a face", "photo"),  # SD 1.x: one call for both rounds differently
    ("a face", "(photo:-1)"),
    ("photo", "(a face:1.2)"),
    ("a photo of a face", "smiling"),
    ("a", "b", "c"),
]


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_a_single_chunk_encodes_bit_for_bit_as_before(model: str, request: pytest.FixtureRequest) -> None:
    inpainter = request.getfixturevalue(model)
    for text in SINGLE_CHUNKS:
        assert same(encode(inpainter, text), former_encoding(inpainter, (text,), per_chunk=False)), text


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_each_break_chunk_is_its_own_encoder_call_with_its_own_empty_window(
    model: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    inpainter = request.getfixturevalue(model)
    batches: list[tuple[int, int]] = []  # (encoder, windows in the call)
    for number, encoder in enumerate(inpainter.components.text_encoders):
        def counting(
            ids: torch.Tensor, *args: object, _number: int = number, _forward=encoder.forward, **kwargs: object
        ):
            batches.append((_number, int(ids.shape[0])))
            return _forward(ids, *args, **kwargs)

        monkeypatch.setattr(encoder, "forward", counting)
    for chunks in SEVERAL_CHUNKS:
        batches.clear()
        ours = encode(inpainter, *chunks)
        # as Impact's one CLIPTextEncode per chunk: a call per chunk and encoder, each with one
        # window per 75 tokens plus the empty prompt's window when the chunk has a weight ≠ 1
        expected = [(number, 1 + ("(" in chunk)) for number in range(len(inpainter.components.text_encoders))
                    for chunk in chunks]  # fmt: skip
        assert sorted(batches) == sorted(expected), chunks
        assert same(ours, former_encoding(inpainter, chunks, per_chunk=True)), chunks


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_weight_one_is_no_emphasis(model: str, request: pytest.FixtureRequest) -> None:
    inpainter = request.getfixturevalue(model)
    plain, plain_pooled = encode(inpainter, "a face")
    for text in ("(a:1.0) face", "(a:1) (face:1.0)", r"a face"):
        hidden, pooled = encode(inpainter, text)
        assert torch.equal(hidden, plain), text
        assert (pooled is None) or torch.equal(pooled, plain_pooled)
    # the parentheses are syntax: "(a) face" is not the tokens "(", "a", ")" any more
    assert not torch.equal(encode(inpainter, "(a) face")[0], plain)


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_a_weighted_token_is_moved_from_the_empty_prompt_and_the_others_are_untouched(
    model: str, request: pytest.FixtureRequest
) -> None:
    inpainter = request.getfixturevalue(model)
    hidden, pooled = encode(inpainter, "a (face:1.5) photo")
    assert hidden.shape[1] == 77
    offset = 0
    for index, tokenizer in enumerate(inpainter.components.tokenizers):
        raw, text_embeds = raw_hidden(
            inpainter, index, [window(tokenizer, [A, FACE, PHOTO]), window(tokenizer, [])]  # the prompt, then ""
        )
        z, z_empty = raw[0], raw[1]
        width = z.shape[-1]
        ours = hidden[0, :, offset : offset + width]
        expected = z.clone()
        expected[2] = (z[2] - z_empty[2]) * 1.5 + z_empty[2]
        assert torch.equal(ours[2], expected[2]), "the weighted token follows ComfyUI's rule"
        assert not torch.allclose(ours[2], z[2], atol=1e-3), "and it did change"
        others = [i for i in range(77) if i != 2]
        assert torch.equal(ours[others], z[others]), "BOS, the other words, EOS and padding are untouched"
        if text_embeds is not None:  # SDXL: pooled from the unweighted first window
            assert torch.equal(pooled, text_embeds[:1])
        offset += width
    assert offset == hidden.shape[-1], "both SDXL encoders are weighted, each against its own empty prompt"


def test_nested_and_fractional_weights_on_a_long_prompt_across_windows(sd: Inpainter) -> None:
    tokenizer = sd.components.tokenizers[0]
    text = " ".join(["a"] * 74) + " ((photo)) (face:0.5)"  # "photo" fits as the 75th token, "face" moves on
    hidden, _ = encode(sd, text)
    assert hidden.shape[1] == 154
    first, second = window(tokenizer, [A] * 74 + [PHOTO]), window(tokenizer, [FACE])
    raw, _ = raw_hidden(sd, 0, [first, second, window(tokenizer, [])])
    z_empty = raw[2]
    expected = raw[:2].clone()
    expected[0, 75] = (raw[0, 75] - z_empty[75]) * 1.2100000000000002 + z_empty[75]
    expected[1, 1] = (raw[1, 1] - z_empty[1]) * 0.5 + z_empty[1]
    assert torch.equal(hidden[0], expected.reshape(154, -1))


def test_break_chunks_are_weighted_each_on_its_own_windows(sd: Inpainter) -> None:
    tokenizer = sd.components.tokenizers[0]
    hidden, _ = encode(sd, "a face", "(photo:-1)")
    plain, _ = raw_hidden(sd, 0, [window(tokenizer, [A, FACE])])  # the first chunk alone: no empty window
    weighted, _ = raw_hidden(sd, 0, [window(tokenizer, [PHOTO]), window(tokenizer, [])])  # its own empty one
    expected = torch.cat([plain[0], weighted[0]])
    expected[77 + 1] = (weighted[0, 1] - weighted[1, 1]) * -1.0 + weighted[1, 1]
    assert torch.equal(hidden[0], expected)


def test_the_prompt_cache_keeps_weighted_and_plain_texts_apart(sd: Inpainter) -> None:
    sd._prompts.clear()
    plain, _ = sd._prompt((), ("a face",))
    weighted, _ = sd._prompt((), ("(a face:1.3)",))
    assert not torch.equal(plain, weighted)
    assert sd._prompt((), ("(a face:1.3)",))[0] is weighted and len(sd._prompts) == 2


def test_an_embedding_or_a_nan_weight_is_refused_before_the_engine(sd: Inpainter) -> None:
    image = np.full((64, 64, 3), 128, np.uint8)
    settings = SamplingSettings(steps=2, denoise=0.5)
    refused = [
        RefineJob(image=image, noise_mask=None, positive=("a embedding:easynegative",), negative=("",), seed=1),
        RefineJob(image=image, noise_mask=None, positive=("a",), negative=("(blurry:nan)",), seed=1),
    ]
    for job, match in zip(refused, ["job 0: positive: textual-inversion", "job 0: negative: .*nan"], strict=True):
        with pytest.raises(PromptSyntaxError, match=match):
            sd.payloads([job], settings)
