"""Per-face prompts from the ``wildcard`` input (spec §7, reference §5.1–5.2, §8).

Unlike the reference (Q6), every random choice comes from ``random.Random`` seeded with the face's
seed (text expansion) or the image's base seed (``[SEP:R]`` draws, ``[RND]`` shuffles), so a
request is reproducible (Decision 4).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from facedetailer.seeds import SEED_MODULUS
from facedetailer.segs import SEG

CONCAT_PREFIX = "[CONCAT]"
SEP_RANDOM_MAX = 2**50  # [SEP:R] draws an integer in [0, 2**50], as the reference
MAX_EXPANSION_ROUNDS = 100  # the reference's nesting limit
MAX_EXPANDED_CHARS = 100_000  # guards against self-referencing wildcard files growing without bound

_MODE_PREFIX = re.compile(r"\[(ASC-SIZE|DSC-SIZE|ASC|DSC|RND)\]")  # the -SIZE forms must win over ASC/DSC
_SEPARATOR = re.compile(r"\[SEP(?::\w+)?\]")
_LABEL_ENTRY = re.compile(r"\[([A-Za-z0-9_. ]+)\]([^\[]+)")
_OPTION_GROUP = re.compile(r"(?<!\\)\{((?:\\[{}]|[^{}])*?)(?<!\\)\}")  # innermost {...}, \{ \} escaped
_WILDCARD_NAME = re.compile(r"__([\w.\-+/*\\]+?)__")
_QUANTIFIED_WILDCARD = re.compile(r"(\d+)#__([\w.\-+/*\\]+?)__")
_COUNT_SPEC = re.compile(r"\s*(\d+)?\s*(?:-\s*(\d+))?\s*")
_NUMBER = re.compile(r"-?(\d*\.?\d+|\d+\.?\d*)")
_LORA_TAG = re.compile(r"<lora:([^>]+)>")
_LBW_PRESET = re.compile(r"LBW=[A-Za-z][A-Za-z0-9_-]*:")


@dataclass(frozen=True)
class LoraTag:
    """``<lora:name[:model_weight[:clip_weight]]>``; the inpainter resolves and loads it."""

    name: str
    model_weight: float
    clip_weight: float


@dataclass(frozen=True)
class FacePrompt:
    """What one face gets. ``text`` None = use the input positive unchanged."""

    skip: bool
    stop: bool
    seed: int | None
    text: str | None
    concat: bool
    loras: tuple[LoraTag, ...] = ()


@dataclass(frozen=True)
class WildcardPlan:
    """Processing order (indices into the SEGS list) and ``prompts[j]`` for ``segs[order[j]]``."""

    order: list[int]
    prompts: list[FacePrompt]
    mode: str | None = field(default=None)  # ASC, DSC, ASC-SIZE, DSC-SIZE, RND, LAB or None


# --- text expansion -------------------------------------------------------------------------


def _normalise_name(name: str) -> str:
    return name.replace("\\", "/").replace(" ", "-").lower()


def _drop_comment_lines(text: str) -> str:
    """Remove lines starting with '#'; the line after a comment joins the previous line."""
    kept: list[str] = []
    join_next = False
    for line in text.split("\n"):
        if line.lstrip().startswith("#"):
            join_next = True
            continue
        if kept and join_next:
            kept[-1] += " " + line
        else:
            kept.append(line)
        join_next = False
    return "\n".join(kept)


def _split_weight(option: str) -> tuple[float, str]:
    """``"2::text"`` → (2.0, "text"); no numeric prefix → weight 1."""
    head, sep, rest = option.partition("::")
    if sep and _NUMBER.fullmatch(head.strip()):
        return max(float(head.strip()), 0.0), rest
    return 1.0, option


def _weighted_sample(options: Sequence[str], count: int, rng: random.Random) -> list[str]:
    """``count`` distinct options drawn by weight, without replacement, in draw order."""
    pool = [_split_weight(option) for option in options]
    chosen: list[str] = []
    for _ in range(min(count, len(pool))):
        weights = [w for w, _ in pool]
        if sum(weights) <= 0:
            weights = [1.0] * len(pool)
        index = rng.choices(range(len(pool)), weights=weights)[0]
        chosen.append(pool.pop(index)[1])
    return chosen


class _Expander:
    """One expansion run: wildcard files (normalised names) and the random generator."""

    def __init__(self, rng: random.Random, wildcard_files: Mapping[str, Sequence[str]] | None) -> None:
        self.rng = rng
        self.files = {
            _normalise_name(name): [line for line in lines if not line.strip().startswith("#")]
            for name, lines in (wildcard_files or {}).items()
        }

    def lookup(self, name: str) -> list[str] | None:
        """Lines of ``name``; ``*`` globs over names; a bare name also tries ``*/name``."""
        key = _normalise_name(name)
        if key in self.files:
            return self.files[key]
        if "*" in key:
            pattern = re.compile(re.escape(key).replace(r"\*", ".*"))
            lines = [
                line
                for candidate, values in self.files.items()
                if pattern.fullmatch(candidate) or pattern.fullmatch(candidate + "/")
                for line in values
            ]
            return lines or None
        if "/" not in key:
            return self.lookup("*/" + key)
        return None

    def choose_group(self, match: re.Match[str]) -> str:
        """Resolve one ``{...}``: ``w::opt`` weights, ``n$$``, ``a-b$$``, ``-b$$``, ``a-b$$sep$$``."""
        options = match.group(1).split("|")
        separator = " "
        count_range: tuple[int, int] | None = None
        head = options[0].split("$$")
        spec = _COUNT_SPEC.fullmatch(head[0]) if len(head) > 1 else None
        if spec and (spec.group(1) or spec.group(2)):
            low = int(spec.group(1)) if spec.group(1) else 1
            high = int(spec.group(2)) if spec.group(2) else low
            count_range = (min(low, high), max(low, high))
            if len(head) >= 3:
                separator, options[0] = head[1], "$$".join(head[2:])
            else:
                options[0] = head[1]
            name = _WILDCARD_NAME.fullmatch(options[0].strip())
            if len(options) == 1 and name and (lines := self.lookup(name.group(1))):
                options = list(lines)
        if count_range is None:
            count = 1
        else:
            low, high = count_range[0], min(count_range[1], len(options))
            count = self.rng.randint(low, high) if low <= high else low
        return separator.join(_weighted_sample(options, count, self.rng))

    def replace_wildcards(self, text: str) -> tuple[str, bool]:
        """Replace each known ``__name__`` occurrence by one of its lines; unknown names stay."""
        replaced = False
        for name in _WILDCARD_NAME.findall(text):
            lines = self.lookup(name)
            if lines:
                text = text.replace(f"__{name}__", _weighted_sample(lines, 1, self.rng)[0], 1)
                _check_length(len(text))
                replaced = True
        return text, replaced

    def expand(self, text: str) -> str:
        text = _drop_comment_lines(text)
        for _ in range(MAX_EXPANSION_ROUNDS):
            text = _QUANTIFIED_WILDCARD.sub(_repeat_wildcard, text)
            options_replaced = False
            while _OPTION_GROUP.search(text):
                text = _OPTION_GROUP.sub(self.choose_group, text)
                options_replaced = True
            text, wildcards_replaced = self.replace_wildcards(text)
            _check_length(len(text))
            if not (options_replaced or wildcards_replaced):
                break
        return text


def _check_length(length: int) -> None:
    if length > MAX_EXPANDED_CHARS:
        raise ValueError(f"wildcard expansion grew past {MAX_EXPANDED_CHARS} characters")


def _repeat_wildcard(match: re.Match[str]) -> str:
    """``N#__name__`` → ``__name__|__name__|…`` (N alternatives, for a ``{…}`` group)."""
    token = f"__{match.group(2)}__"
    count = int(match.group(1))
    _check_length(count * (len(token) + 1))
    return "|".join([token] * count)


def expand_text(text: str, rng: random.Random, wildcard_files: Mapping[str, Sequence[str]] | None = None) -> str:
    """Expand ``{a|b}``, ``2::a`` weights, ``n$$``/``a-b$$sep$$`` multi-picks, ``N#__f__`` and
    ``__file__`` (nested, until nothing is left), after removing ``#`` comment lines (reference §8.3).
    """
    return _Expander(rng, wildcard_files).expand(text)


def extract_loras(text: str) -> tuple[str, tuple[LoraTag, ...]]:
    """Remove ``<lora:name:w_model:w_clip>`` tags; weights default to 1.0, clip to the model weight.

    The first tag of a name wins. ``LBW=``/``LOADER=`` attributes are ignored (reference §8.4).
    """
    tags: list[LoraTag] = []
    seen: set[str] = set()
    for body in _LORA_TAG.findall(text):
        name, *attributes = _LBW_PRESET.sub("LBW=", body.strip(":")).split(":")
        weights = [float(a) for a in attributes if _NUMBER.fullmatch(a)][:2]
        model_weight = weights[0] if weights else 1.0
        clip_weight = weights[1] if len(weights) > 1 else model_weight
        if name not in seen:
            seen.add(name)
            tags.append(LoraTag(name=name, model_weight=model_weight, clip_weight=clip_weight))
    return _LORA_TAG.sub("", text), tuple(tags)


def split_break(text: str) -> list[str]:
    """Chunks between ``BREAK`` (plain substring, as the reference), stripped, empty ones dropped.

    A text with no chunk gives ``[""]``: the reference then encodes the empty prompt.
    """
    chunks = [chunk.strip() for chunk in text.split("BREAK")]
    return [chunk for chunk in chunks if chunk] or [""]


# --- per-face plan --------------------------------------------------------------------------


def _split_items(body: str, rng: random.Random) -> list[tuple[int | None, str]]:
    """``a[SEP]b[SEP:7]c`` → [(None, a), (None, b), (7, c)]: a separator sets the next item's seed.

    Items are not stripped and empty items are kept. ``[SEP:R]`` draws from ``rng``; a separator
    value that is not an integer gives no seed; a larger one is taken modulo 2**64.
    """
    texts = _SEPARATOR.split(body)
    seeds: list[int | None] = [None]
    for separator in _SEPARATOR.findall(body):
        value = separator[5:-1]
        if separator == "[SEP:R]":
            seeds.append(rng.randint(0, SEP_RANDOM_MAX))
        else:
            try:
                seeds.append(int(value) % SEED_MODULUS if value else None)  # a usable sampler seed
            except ValueError:
                seeds.append(None)
    return list(zip(seeds, texts, strict=True))


def _label_entries(text: str) -> dict[str, str]:
    """``[LAB]`` entries ``[label] text`` → {label: stripped text}, empty texts dropped."""
    entries = {label: value.strip() for label, value in _LABEL_ENTRY.findall(text)}
    return {label: value for label, value in entries.items() if value}


def _processing_order(mode: str | None, segs: Sequence[SEG]) -> list[int]:
    """ASC/DSC by bbox (x1, y1), ASC-SIZE/DSC-SIZE by bbox area, else detection order (§5.1)."""
    indices = list(range(len(segs)))
    if mode in ("ASC", "DSC"):
        return sorted(indices, key=lambda k: (segs[k].bbox[0], segs[k].bbox[1]), reverse=mode == "DSC")
    if mode in ("ASC-SIZE", "DSC-SIZE"):

        def area(k: int) -> float:
            x1, y1, x2, y2 = segs[k].bbox
            return (x2 - x1) * (y2 - y1)

        return sorted(indices, key=area, reverse=mode == "DSC-SIZE")
    return indices


def _face_prompt(
    item: str,
    explicit_seed: int | None,
    face_seed: int,
    concat: bool,
    wildcard_files: Mapping[str, Sequence[str]] | None,
) -> FacePrompt:
    """Expand one face's item with its own seed. Only an exactly empty item means "input positive"."""
    if item.strip() == "[SKIP]":
        return FacePrompt(skip=True, stop=False, seed=explicit_seed, text=None, concat=concat)
    if item.strip() == "[STOP]":
        return FacePrompt(skip=False, stop=True, seed=explicit_seed, text=None, concat=concat)
    if item == "":
        return FacePrompt(skip=False, stop=False, seed=explicit_seed, text=None, concat=concat)
    expanded = expand_text(item, random.Random(face_seed), wildcard_files)
    text, loras = extract_loras(expanded)
    return FacePrompt(skip=False, stop=False, seed=explicit_seed, text=text.strip(), concat=concat, loras=loras)


def plan_wildcards(
    wildcard: str,
    segs: Sequence[SEG],
    *,
    seed: int,
    wildcard_files: Mapping[str, Sequence[str]] | None = None,
) -> WildcardPlan:
    """Processing order and per-face prompts for one image; ``seed`` is its base seed (seed + k).

    The face at position j uses seed + j unless its separator fixes one (``[SEP:n]``/``[SEP:R]``).
    A SEG with an all-zero mask is skipped: it uses up a position (seed index) but no item (§5.2).
    After a ``[STOP]`` every remaining face is marked ``stop`` too.
    """
    concat = wildcard.startswith(CONCAT_PREFIX)
    text = wildcard[len(CONCAT_PREFIX) :] if concat else wildcard
    plan_rng = random.Random(seed)
    labels: dict[str, str] | None = None
    items: list[tuple[int | None, str]]
    if text.startswith("[LAB]"):
        mode, labels, items = "LAB", _label_entries(text), []
    elif match := _MODE_PREFIX.match(text):
        mode, items = match.group(1), _split_items(text[match.end() :], plan_rng)
        if mode == "RND":
            plan_rng.shuffle(items)
    else:
        mode, items = None, [(None, text)]

    order = _processing_order(mode, segs)
    prompts: list[FacePrompt] = []
    next_item = 0
    stopped = False
    for position, seg_index in enumerate(order):
        if stopped:
            prompts.append(FacePrompt(skip=False, stop=True, seed=None, text=None, concat=concat))
            continue
        if not segs[seg_index].cropped_mask.any():
            prompts.append(FacePrompt(skip=True, stop=False, seed=None, text=None, concat=concat))
            continue
        if labels is not None:
            explicit_seed, item = None, labels.get("ALL", "") + labels.get(segs[seg_index].label, "")  # Q7
        else:
            if next_item >= len(items):
                next_item = 0
                if mode == "RND":
                    plan_rng.shuffle(items)
            explicit_seed, item = items[next_item]
            next_item += 1
        face_seed = explicit_seed if explicit_seed is not None else (seed + position) % SEED_MODULUS
        prompt = _face_prompt(item, explicit_seed, face_seed, concat, wildcard_files)
        stopped = prompt.stop
        prompts.append(prompt)
    return WildcardPlan(order=order, prompts=prompts, mode=mode)
