"""Parity of the inpainter's prompt encoding (emphasis, windows, BREAK) with ComfyUI's own code.

Drives ComfyUI's real text path — ``SDTokenizer.tokenize_with_weights`` (escapes, ``token_weights``,
windows) and ``ClipTokenWeightEncoder.encode_token_weights`` (empty window, per-token rule, pooled
output), plus ``SDXLClipModel.encode_token_weights`` for SDXL's two encoders — around the SAME torch
text encoders our inpainter uses (the project's tiny SD 1.x and SDXL models: real CLIP BPE
vocabulary, real architectures, random weights), and compares with ``Inpainter._encode_prompt`` on
hand-picked prompts and random ones built from words, parentheses, weights and escapes (short
ones, and long ones of several windows). BREAK
chunks are encoded one by one and joined on the token axis with the first chunk's pooled output,
as Impact's CLIPTextEncode + ConditioningConcat do.

It prints, per model: prompts whose windows (ids and weights) equal ComfyUI's (prompts of more
than one window counted apart too: ComfyUI 0.3.64 tokenizes a whole weighted segment at once, so
a segment of 8+ tokens is cut anywhere at a window's end — ``facedetailer/token_windows.py`` does
the same), prompts whose embeddings (hidden states, and SDXL's pooled output) are bit-identical,
the max |ours − ComfyUI|, and the same count for the former batching of every BREAK chunk's
windows in one encoder call (kept as a control: ComfyUI encodes one call per chunk).

ComfyUI is not a dependency: give the path of a checkout (its ``comfy`` imports need ``einops``
besides what this project installs, e.g. ``pip install --target /tmp/deps einops`` and
``PYTHONPATH=/tmp/deps``). Run it under /work/wt/heavy (it loads models).

    python benchmarks/emphasis_parity.py --comfyui /path/to/ComfyUI [--random 300] [--random-long 100]
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deployments.inpainter import Inpainter, _prompt_windows, _special_tokens, apply_token_weights  # noqa: E402
from deployments.testing.build_tiny_models import build_component  # noqa: E402
from facedetailer.prompt_weights import PromptSyntaxError, check_prompt  # noqa: E402
from facedetailer.token_windows import empty_window  # noqa: E402
from facedetailer.wildcards import split_break  # noqa: E402

PROMPTS = [
    "a photo of a face",
    "a (smiling:1.2) face, ((freckles))",
    "(((detailed eyes))), (blurry:0.5), portrait",
    "((a:1.5) b) (c (d:0.5):1.5) (e:-1)",
    r"\(not weighted\) (weighted) \\(x)",
    "(a:b) (:1.5) (a:) (a: 1.5 ) (a:1e-1) (unclosed",
    "stray) (b) (c) then (d)",
    "(a (b)",
    "(face:1.3) BREAK (eyes:0.7), detailed BREAK plain text",
    "(a\nb:1.2) c\n(d)",
    "",
    "()",
    " ".join(["a"] * 74) + " ((photo)) (face:0.5)",
    " ".join(["(portrait:1.1)"] * 40) + " BREAK " + " ".join(["face"] * 90),
    "(supercalifragilisticexpialidocious:1.4) " * 12,
    " ".join(["a"] * 74) + " photorealistic face",  # one plain group: cut mid-word at 75 tokens
    " ".join(["a"] * 74) + " (photorealistic face:1.2)",  # a short weighted group moves whole
    "a face,\n" * 30 + "  (eyes:1.3)\n\nblue   hair",  # newlines and runs of spaces inside long groups
    "(a face:1.2) BREAK plain " * 3 + "(b:0.8)",  # weights in several chunks, each its own empty window
    " ".join(["face"] * 80) + " BREAK (photo:1.1) " + " ".join(["x"] * 100),
]
WORDS = ["a", "face", "photo", "smiling", "portrait", "detailed", "eyes,", "blue", "hair", "4k", "masterpiece"]
SYNTAX = ["(", ")", "(", ")", ":1.2", ":0.5", ":-1", ":x", "\\(", "\\)", "BREAK", "\n"]


def random_prompt(rng: random.Random, longest: int = 60) -> str:
    pieces = [rng.choice(WORDS) if rng.random() < 0.6 else rng.choice(SYNTAX) for _ in range(rng.randint(1, longest))]
    return "".join(piece + (" " if rng.random() < 0.7 else "") for piece in pieces)


# ---------------------------------------------------------------------- ComfyUI


def load_comfy(path: Path) -> tuple[ModuleType, ModuleType]:
    """ComfyUI's sd1_clip and sdxl_clip from a checkout, CPU only."""
    sys.path.insert(0, str(path))
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.sd1_clip
        import comfy.sdxl_clip
    finally:
        sys.argv = argv
    logging.getLogger().setLevel(logging.ERROR)
    return comfy.sd1_clip, comfy.sdxl_clip


def comfy_encoder(sd1_clip: ModuleType, encoder: Any, special_tokens: dict[str, int], penultimate: bool) -> Any:
    """ComfyUI's token-weight logic (its own class) around one of our text encoders."""

    class Encoder(sd1_clip.ClipTokenWeightEncoder):
        def __init__(self) -> None:
            self.special_tokens = special_tokens

        def encode(self, tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
            with torch.no_grad():  # ComfyUI weights the output in place
                output = encoder(torch.tensor(tokens), output_hidden_states=penultimate)
            hidden = output.hidden_states[-2] if penultimate else output.last_hidden_state
            pooled = getattr(output, "text_embeds", None)
            return hidden.float(), None if pooled is None else pooled.float()

    return Encoder()


class ComfyText:
    """CLIPTextEncode of one chunk as ComfyUI computes it, for one of our checkpoints."""

    def __init__(self, sd1_clip: ModuleType, sdxl_clip: ModuleType, inpainter: Inpainter) -> None:
        parts = inpainter.components
        self.sdxl = parts.is_sdxl
        self.tokenizers, self.encoders, self.folders = [], [], []
        for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders, strict=True):
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            pad_with_end = pad == tokenizer.eos_token_id
            folder = tempfile.TemporaryDirectory(prefix="emphasis-parity-")  # the very files ours loaded
            self.folders.append(folder)
            path = folder.name
            tokenizer.save_pretrained(path)
            self.tokenizers.append(sd1_clip.SDTokenizer(tokenizer_path=path, pad_with_end=pad_with_end))
            special = {"start": tokenizer.bos_token_id, "end": tokenizer.eos_token_id, "pad": pad}
            self.encoders.append(comfy_encoder(sd1_clip, encoder, special, self.sdxl))
        self.sdxl_combine = sdxl_clip.SDXLClipModel.encode_token_weights

    def tokens(self, text: str) -> list[list[list[tuple[int, float]]]]:
        return [tokenizer.tokenize_with_weights(text) for tokenizer in self.tokenizers]

    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        pairs = self.tokens(text)
        if not self.sdxl:
            return self.encoders[0].encode_token_weights(pairs[0])
        holder = argparse.Namespace(clip_l=self.encoders[0], clip_g=self.encoders[1])
        return self.sdxl_combine(holder, {"l": pairs[0], "g": pairs[1]})

    def encode_chunks(self, chunks: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoded = [self.encode(chunk) for chunk in chunks]
        return torch.cat([hidden for hidden, _ in encoded], dim=1), encoded[0][1]


# ---------------------------------------------------------------------- comparison


def batched_chunks(inpainter: Inpainter, chunks: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The encoding before one call per chunk: every chunk's windows (+ one empty) in one call."""
    parts = inpainter.components
    hidden_parts, pooled = [], None
    with torch.inference_mode():
        for tokenizer, encoder in zip(parts.tokenizers, parts.text_encoders, strict=True):
            windows, weights = [], []
            for chunk in chunks:
                chunk_windows, chunk_weights = _prompt_windows(tokenizer, chunk, 77)
                windows, weights = windows + chunk_windows, weights + chunk_weights
            emphasis = any(weight != 1.0 for row in weights for weight in row)
            if emphasis:
                windows.append(empty_window(**_special_tokens(tokenizer)))
            output = encoder(torch.tensor(windows), output_hidden_states=parts.is_sdxl)
            hidden = output.hidden_states[-2] if parts.is_sdxl else output.last_hidden_state
            if emphasis:
                hidden = apply_token_weights(hidden[:-1], hidden[-1], torch.tensor(weights))
            hidden_parts.append(hidden.reshape(1, -1, hidden.shape[-1]))
            if pooled is None and getattr(output, "text_embeds", None) is not None:
                pooled = output.text_embeds[:1]
    return torch.cat(hidden_parts, dim=-1).to(inpainter.dtype), pooled


def compare(name: str, inpainter: Inpainter, comfy: ComfyText, prompts: list[str]) -> dict[str, Any]:
    stats = {"prompts": 0, "one_window": 0, "windows_equal": 0, "bit_identical": 0, "multi_window": 0,
             "multi_window_windows_equal": 0, "multi_window_pairs_equal": 0, "max_abs_diff": 0.0,
             "max_abs_diff_same_windows": 0.0, "refused": 0, "bit_identical_batched": 0}  # fmt: skip
    seconds = {"ours": 0.0, "comfy": 0.0}
    for prompt in prompts:
        chunks = split_break(prompt)
        try:
            for chunk in chunks:
                check_prompt(chunk)
        except PromptSyntaxError:
            stats["refused"] += 1
            continue
        stats["prompts"] += 1
        same_windows, same_pairs, multi = True, True, False
        for index, tokenizer in enumerate(inpainter.components.tokenizers):
            for chunk in chunks:
                ids, weights = _prompt_windows(tokenizer, chunk, 77)
                theirs = comfy.tokens(chunk)[index]
                multi = multi or len(ids) > 1 or len(theirs) > 1
                ours = [list(zip(row, row_weights, strict=True)) for row, row_weights in zip(ids, weights, strict=True)]
                same_windows &= ours == [[(t, w) for t, w in row] for row in theirs]
                specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
                flat = [pair for row in ours for pair in row if pair[0] not in specials]
                flat_theirs = [(t, w) for row in theirs for t, w in row if t not in specials]
                same_pairs &= flat == flat_theirs
        started = time.perf_counter()
        with torch.inference_mode():
            hidden, pooled = inpainter._encode_prompt(tuple(chunks))
        seconds["ours"] += time.perf_counter() - started
        per_chunk, per_chunk_pooled = batched_chunks(inpainter, chunks)  # the former way, as a control
        started = time.perf_counter()
        expected, expected_pooled = comfy.encode_chunks(chunks)
        seconds["comfy"] += time.perf_counter() - started
        stats["multi_window" if multi else "one_window"] += 1
        if multi:
            stats["multi_window_windows_equal"] += same_windows
            stats["multi_window_pairs_equal"] += same_pairs
        stats["windows_equal"] += same_windows
        if hidden.shape == expected.shape:
            difference = (hidden.float() - expected).abs().max().item()
            identical = difference == 0.0 and (pooled is None or torch.equal(pooled.float(), expected_pooled))
            stats["bit_identical"] += identical
            stats["bit_identical_batched"] += torch.equal(per_chunk.float(), expected) and (
                per_chunk_pooled is None or torch.equal(per_chunk_pooled.float(), expected_pooled)
            )
            stats["max_abs_diff"] = max(stats["max_abs_diff"], difference)
            if same_windows:
                stats["max_abs_diff_same_windows"] = max(stats["max_abs_diff_same_windows"], difference)
        else:
            stats["max_abs_diff"] = float("nan")  # a different number of windows
    print(f"\n{name}: {stats['prompts']} prompts encoded ({stats['refused']} refused: embedding:/non-finite weight)")
    print(f"  one window per chunk:  {stats['one_window']}   several windows: {stats['multi_window']}")
    print(f"  windows (ids and weights) equal to ComfyUI's: {stats['windows_equal']} / {stats['prompts']}")
    print(f"    of the several-window prompts: windows equal {stats['multi_window_windows_equal']}, "
          f"(token, weight) sequence equal {stats['multi_window_pairs_equal']} / {stats['multi_window']}")  # fmt: skip
    print(f"  embeddings bit-identical to ComfyUI's: {stats['bit_identical']} / {stats['prompts']}")
    print(f"    if all BREAK chunks shared one encoder call (before): {stats['bit_identical_batched']}"
          f" / {stats['prompts']}")  # fmt: skip
    print(f"  max |ours − ComfyUI|: {stats['max_abs_diff']:.3g} (where the windows are equal: "
          f"{stats['max_abs_diff_same_windows']:.3g})")  # fmt: skip
    print(f"  encode time: ours {seconds['ours'] * 1000:.0f} ms, ComfyUI's code {seconds['comfy'] * 1000:.0f} ms")
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="path of a ComfyUI checkout")
    parser.add_argument("--random", type=int, default=300, help="random prompts besides the hand-picked ones")
    parser.add_argument("--random-long", type=int, default=100, help="random prompts of up to 240 pieces")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", type=Path, default=REPO / ".cache" / "tests" / "tiny-models")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sd1_clip, sdxl_clip = load_comfy(args.comfyui)
    version = (args.comfyui / "comfyui_version.py").read_text().split('"')[1::2][:1]
    print(f"ComfyUI checkout: {args.comfyui} (version {version[0] if version else '?'})")
    rng = random.Random(args.seed)
    prompts = PROMPTS + [random_prompt(rng) for _ in range(args.random)]
    prompts += [random_prompt(rng, longest=240) for _ in range(args.random_long)]  # several windows
    models = build_component("sd", args.models / "sd")  # the tests' tiny models (built if missing)
    for name, key in (("SD 1.x", "pipeline"), ("SDXL", "sdxl_pipeline")):
        inpainter = Inpainter(models[key], device="cpu")
        compare(name, inpainter, ComfyText(sd1_clip, sdxl_clip, inpainter), prompts)


if __name__ == "__main__":
    main()
