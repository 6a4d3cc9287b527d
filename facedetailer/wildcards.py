"""Per-face prompts from the ``wildcard`` input (spec §7, reference §5.1–5.2, §8).

Unlike the reference (Q6), every random choice comes from ``random.Random`` seeded with the face's
seed (text expansion) or the image's base seed (``[SEP:R]`` draws, ``[RND]`` shuffles), so a
request is reproducible (Decision 4). The text grammar is Impact Pack V8's ``process()``
(Decision 8), except that an unknown ``__name__`` stays as written, a name matches a wildcard
file by its whole name (never as a prefix of another), and removing ``#`` comment lines keeps
the other line breaks.
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
_COUNT_RANGE = re.compile(r"(\d+)(-(\d+))?")  # V8's count prefix, matched at the start of the first option
_COUNT_UPPER = re.compile(r"-(\d+)")
_WEIGHT_PREFIX = re.compile(r"^\s*[0-9.]+::")
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
    """Remove the lines that start with '#', keeping every other line and line break (Decision 8).

    (The reference joins the line after a comment onto the one before it; the text CLIP sees has
    the same tokens either way.)
    """
    return "\n".join(line for line in text.split("\n") if not line.lstrip().startswith("#"))


def _option_weight(option: str) -> float:
    """``"2::text"`` weighs 2; an option without a numeric ``w::`` prefix weighs 1."""
    head, sep, _ = option.partition("::")
    return float(head.strip()) if sep and _NUMBER.fullmatch(head.strip()) else 1.0


def _option_text(option: str) -> str:
    """The option without its weight prefix (V8 strips any ``digits-and-dots::`` prefix)."""
    return _WEIGHT_PREFIX.sub("", option, count=1)


def _weighted_sample(options: Sequence[str], count: int, rng: random.Random) -> list[str]:
    """``count`` distinct options drawn by weight, without replacement, in draw order, prefixes removed."""
    pool = list(options)
    chosen: list[str] = []
    for _ in range(min(count, len(pool))):
        weights = [max(_option_weight(option), 0.0) for option in pool]
        if sum(weights) <= 0:
            weights = [1.0] * len(pool)
        index = rng.choices(range(len(pool)), weights=weights)[0]
        chosen.append(_option_text(pool.pop(index)))
    return chosen


def _select_count(options_count: int, low: int, high: int, rng: random.Random) -> int:
    """How many options ``low-high$$`` picks, as V8 computes it (``0$$`` and ``-0$$`` mean any number).

    The upper bound is min(high + 1, n + 1) (n + 1 when high is 0), exclusive; a count above n
    then means "all of them, shuffled".
    """
    upper = min(high + 1, options_count + 1) if high > 0 else options_count + 1
    if max(upper, low) <= 0:
        return 0
    if upper == low:
        return upper
    return rng.randrange(min(low, upper), max(low, upper))


class _Expander:
    """One expansion run: wildcard files (normalised names) and the random generator."""

    def __init__(self, rng: random.Random, wildcard_files: Mapping[str, Sequence[str]] | None) -> None:
        self.rng = rng
        self.files = {
            _normalise_name(name): [line for line in lines if not line.strip().startswith("#")]
            for name, lines in (wildcard_files or {}).items()
        }

    def lookup(self, name: str) -> tuple[list[str], bool] | None:
        """(lines, exact) for ``name``: its file, or the union of files a ``*`` glob or a bare
        name (as ``*/name``) matches. Names match whole, never as a prefix of another (Decision 8).
        """
        key = _normalise_name(name)
        if key in self.files:
            return self.files[key], True
        if "*" in key:
            pattern = re.compile(re.escape(key).replace(r"\*", ".*"))
            lines = [
                line
                for candidate, values in self.files.items()
                if pattern.fullmatch(candidate) or pattern.fullmatch(candidate + "/")
                for line in values
            ]
            return (lines, False) if lines else None
        if "/" not in key:
            return self.lookup("*/" + key)
        return None

    def wildcard_options(self, pattern: str) -> list[str]:
        """Every line of every wildcard named in ``pattern`` (a ``{n$$__name__}`` group's options)."""
        options: list[str] = []
        for name in _WILDCARD_NAME.findall(pattern):
            found = self.lookup(name)
            if found:
                options.extend(found[0])
        return options

    def choose_group(self, match: re.Match[str]) -> str:
        """Resolve one ``{...}`` as V8's ``replace_option``: ``w::opt`` weights, ``n$$``, ``a-b$$``,
        ``-b$$``, ``a-b$$sep$$``, ``n$$__wildcard__``; weights summing to at most 1 give every
        option, shuffled.
        """
        options = match.group(1).split("|")
        separator = " "
        count_range: tuple[int, int] | None = None
        head = options[0].split("$$")
        if len(head) > 1:
            count_range = self._count_range(options[0])
        if count_range is not None and len(head) in (2, 3):
            if len(head) == 3:
                separator = head[1]
            pattern = head[-1]
            from_files = self.wildcard_options(pattern) if len(options) == 1 else []
            if from_files:
                options = from_files
            else:  # an unknown wildcard stays as written (Decision 8)
                options[0] = pattern
        total_weight = sum(_option_weight(option) for option in options)
        count = 1 if count_range is None else _select_count(len(options), *count_range, self.rng)
        if count > len(options) or total_weight <= 1:
            shuffled = list(options)
            self.rng.shuffle(shuffled)
            return separator.join(_option_text(option) for option in shuffled)
        return separator.join(_weighted_sample(options, count, self.rng))

    @staticmethod
    def _count_range(first_option: str) -> tuple[int, int] | None:
        """``a``/``a-b`` (matched at the start, as V8) or ``-b``; None where V8 would fail."""
        if spec := _COUNT_RANGE.match(first_option):
            low = int(spec.group(1))
            return low, int(spec.group(3)) if spec.group(3) else low
        if spec := _COUNT_UPPER.match(first_option):
            return 1, int(spec.group(1))
        return None

    def replace_wildcards(self, text: str) -> tuple[str, bool]:
        """Replace each known ``__name__`` occurrence by one of its lines; unknown names stay.

        A file's lines are drawn by their ``w::`` weights (prefix removed); a glob draws uniformly
        over the union of its files' lines, as V8 does.
        """
        replaced = False
        for name in _WILDCARD_NAME.findall(text):
            found = self.lookup(name)
            if not found:
                continue
            lines, exact = found
            line = _weighted_sample(lines, 1, self.rng)[0] if exact else self.rng.choice(lines)
            text = text.replace(f"__{name}__", line, 1)
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
