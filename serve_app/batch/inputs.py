"""A bulk job's inputs: a folder, a glob, a text or Parquet list of paths, or one image — on any filesystem.

- a **folder** (``photos/``, ``s3://bucket/run-42``): every ``.png``/``.jpg``/``.jpeg``/``.webp``
  under it, recursively;
- a **glob** (``photos/*.jpg``, ``s3://bucket/**/faces-*.png``): ``*`` and ``?`` stay inside one
  folder, ``**`` crosses folders, ``[abc]`` is a set;
- a **list**: a ``.txt`` file with one path or URI per line (blank lines and ``#`` comments
  skipped; relative paths are relative to the list's folder), or a ``.parquet`` file with a
  ``path`` column;
- **one image** file.

Hidden files and folders (a name starting with ``.``) are skipped in folders and globs, and so is
everything under the job's OUTPUT when it lies inside INPUT. Each input gets a *key*: its path
relative to the input folder (for a list: to the folder all its entries share) without the
suffix — ``holiday/beach-01`` for ``holiday/beach-01.jpg``. Outputs are named after the key. When
two inputs differ only by suffix (``a.jpg`` and ``a.png``), both keep their suffix in the key
(``a.jpg``, ``a.png``), so no output overwrites another.
"""

from __future__ import annotations

import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from serve_app.batch.storage import Location, StorageError, list_files, read_bytes, resolve

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TEXT_LIST_SUFFIXES = (".txt",)
PARQUET_LIST_SUFFIXES = (".parquet",)
PATH_COLUMN = "path"
_GLOB_CHARS = re.compile(r"[*?\[]")


class InputError(StorageError):
    """INPUT cannot be listed (missing, empty list, a Parquet list without a path column…)."""


@dataclass(frozen=True)
class InputFile:
    """One image to detail."""

    input: str  # its path or URI, as recorded in the manifest
    path: str  # inside its filesystem
    source: str  # which filesystem: a key of :attr:`InputListing.filesystems`
    key: str  # outputs are named after it
    size: int | None = None  # bytes, when the listing knows it


@dataclass
class InputListing:
    files: list[InputFile]
    filesystems: dict[str, pafs.FileSystem] = field(default_factory=dict)
    kind: str = "folder"  # folder, glob, list or file


def list_inputs(
    spec: str, *, exclude: Location | None = None, filesystem: pafs.FileSystem | None = None
) -> InputListing:
    """Every input ``spec`` names, sorted by key (see the module docstring)."""
    base_spec, pattern = _split_glob(str(spec))
    if pattern is not None:
        location = resolve(base_spec, filesystem)
        return _listing(location, _walk(location, exclude, _glob_regex(pattern)), "glob")
    location = resolve(spec, filesystem)
    info = location.filesystem.get_file_info(location.path)
    if info.type == pafs.FileType.Directory:
        return _listing(location, _walk(location, exclude, None), "folder")
    if info.type != pafs.FileType.File:
        raise InputError(f"{spec}: no such file or folder")
    suffix = posixpath.splitext(location.path)[1].lower()
    if suffix in TEXT_LIST_SUFFIXES + PARQUET_LIST_SUFFIXES:
        return _list_file(location, suffix in PARQUET_LIST_SUFFIXES)
    name = posixpath.basename(location.path)
    only = InputFile(location.display(location.path), location.path, "input", posixpath.splitext(name)[0], info.size)
    return InputListing([only], {"input": location.filesystem}, "file")


def _listing(location: Location, found: list[tuple[str, int | None]], kind: str) -> InputListing:
    entries = [(location.display(path), path, "input", _relative(location.path, path), size) for path, size in found]
    return InputListing(_with_keys(entries), {"input": location.filesystem}, kind)


def _relative(root: str, path: str) -> str:
    return path[len(root) :].lstrip("/") if root != "/" else path.lstrip("/")


def _walk(
    location: Location, exclude: Location | None, pattern: re.Pattern[str] | None
) -> list[tuple[str, int | None]]:
    """(path, size) of the image files under ``location`` (matching ``pattern`` when given)."""
    found = []
    for info in list_files(location):
        relative = _relative(location.path, info.path)
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        if exclude is not None and _inside(info.path, exclude, location):
            continue
        if pattern is not None:
            if not pattern.fullmatch(relative):
                continue
        elif posixpath.splitext(relative)[1].lower() not in IMAGE_SUFFIXES:
            continue
        found.append((info.path, info.size))
    return found


def _inside(path: str, folder: Location, location: Location) -> bool:
    same_filesystem = folder.filesystem.type_name == location.filesystem.type_name
    return same_filesystem and (path == folder.path or path.startswith(folder.path.rstrip("/") + "/"))


def _split_glob(spec: str) -> tuple[str, str | None]:
    """``("photos", "**/*.jpg")`` for ``photos/**/*.jpg``; ``(spec, None)`` without glob characters."""
    parts = urlsplit(spec) if "://" in spec else None
    path = spec if parts is None else parts.path
    if not _GLOB_CHARS.search(path):
        return spec, None
    components = path.split("/")
    first = next(index for index, part in enumerate(components) if _GLOB_CHARS.search(part))
    base, pattern = "/".join(components[:first]), "/".join(components[first:])
    if parts is None:
        return base or ".", pattern
    return parts._replace(path=base).geturl(), pattern


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as a regular expression over ``/``-separated relative paths."""
    out, index = [], 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            out.append("(?:.*/)?")
            index += 3
            continue
        if pattern.startswith("**", index):
            out.append(".*")
            index += 2
            continue
        char = pattern[index]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[" and "]" in pattern[index + 2 :]:
            end = pattern.index("]", index + 2)
            members = pattern[index + 1 : end]
            if members.startswith("!"):
                members = "^" + members[1:]
            out.append(f"[{members.replace(chr(92), chr(92) * 2)}]")
            index = end
        else:
            out.append(re.escape(char))
        index += 1
    return re.compile("".join(out))


def _list_file(location: Location, parquet: bool) -> InputListing:
    """The entries of a ``.txt`` or ``.parquet`` list, each resolved on its own filesystem."""
    entries = _parquet_entries(location) if parquet else _text_entries(location)
    if not entries:
        raise InputError(f"{location.uri}: the list names no input")
    folder = posixpath.dirname(location.path)
    own_scheme = urlsplit(location.uri).scheme if "://" in location.uri else ""
    filesystems: dict[str, pafs.FileSystem] = {}
    resolved: list[tuple[str, str, str, int | None]] = []
    for entry in entries:
        scheme = urlsplit(entry).scheme if "://" in entry else ""
        if scheme in ("", "file") and own_scheme in ("", "file"):
            path = entry if scheme == "" else urlsplit(entry).path
            path = posixpath.normpath(path if posixpath.isabs(path) else posixpath.join(folder, path))
            source, shown = "local", path
            filesystems.setdefault(source, location.filesystem)
        elif scheme == own_scheme:  # same store as the list: its filesystem (endpoint, credentials)
            parts = urlsplit(entry)
            path, source, shown = f"{parts.netloc}{parts.path}", scheme, entry
            filesystems.setdefault(source, location.filesystem)
        elif scheme == "":  # a relative entry in a list on an object store
            path = posixpath.normpath(posixpath.join(folder, entry))
            source, shown = own_scheme, location.display(path)
            filesystems.setdefault(source, location.filesystem)
        else:
            other = resolve(entry)
            source, path, shown = urlsplit(other.uri).scheme or "local", other.path, other.uri
            filesystems.setdefault(source, other.filesystem)
        resolved.append((shown, path, source, None))
    prefix = _common_folder([shown for shown, _, _, _ in resolved])
    rows = [(shown, path, source, _key_path(shown, prefix), size) for shown, path, source, size in resolved]
    return InputListing(_with_keys(rows), filesystems, "list")


def _text_entries(location: Location) -> list[str]:
    text = read_bytes(location.filesystem, location.path).decode("utf-8-sig")
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _parquet_entries(location: Location) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(location.path, filesystem=location.filesystem, columns=[PATH_COLUMN])
    except (KeyError, ValueError) as error:  # pyarrow's error for a missing column is an ArrowInvalid
        raise InputError(f"{location.uri}: a Parquet list needs a string column named {PATH_COLUMN!r}") from error
    return [str(value) for value in table.column(PATH_COLUMN).to_pylist() if value]


def _common_folder(shown: list[str]) -> list[str]:
    """The leading ``/``-components every entry's folder shares."""
    folders = [entry.split("/")[:-1] for entry in shown]
    common = folders[0]
    for parts in folders[1:]:
        length = 0
        while length < min(len(common), len(parts)) and common[length] == parts[length]:
            length += 1
        common = common[:length]
    return common


def _key_path(shown: str, prefix: list[str]) -> str:
    rest = shown.split("/")[len(prefix) :]
    return "/".join(part.rstrip(":") for part in rest if part not in ("", ".", ".."))


def _with_keys(entries: list[tuple[str, str, str, str, int | None]]) -> list[InputFile]:
    """Keys without suffix; inputs that would share one keep their suffix. Sorted by key."""
    stems = Counter(posixpath.splitext(relative)[0] for _, _, _, relative, _ in entries)
    files = []
    for shown, path, source, relative, size in entries:
        stem = posixpath.splitext(relative)[0]
        files.append(InputFile(shown, path, source, stem if stems[stem] == 1 else relative, size))
    duplicates = [key for key, count in Counter(item.key for item in files).items() if count > 1]
    if duplicates:
        raise InputError(f"inputs would share output names: {', '.join(sorted(duplicates)[:5])}")
    return sorted(files, key=lambda item: item.key)
