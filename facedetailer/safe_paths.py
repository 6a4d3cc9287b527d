"""Names a request controls (LoRA tags, wildcard files, checkpoints, ControlNets) stay inside their folder.

A request may name a file (``<lora:name:1.0>``, ``__wildcard__``, a checkpoint or ControlNet by
name); the operator configures the folder. ``folder / name`` alone follows ``..`` and, for an
absolute name, replaces the folder entirely, so a request could make the service open any file
on the server. Every place that turns a request's name into a path goes through this module:

- :func:`check_name` — the syntactic rule, no file system needed (the ingress can apply it
  before any model work): a relative path of ordinary components; no ``..``, no absolute or
  drive or UNC path, no ``~``, no backslash, no NUL or control characters — checked on the name
  as given and on its Unicode NFKC form, so look-alikes (fullwidth ``．．／``, the one-dot leader
  ``․``) that some layer might normalise later cannot turn into ``../``.
- :func:`resolve_inside` — the rule plus the file system: the path, with every symlink
  followed, must still lie inside the folder (a symlink inside pointing out is refused).
- :func:`files_inside` — every file under a folder whose real path stays inside it (for
  listings and suffix matches).

``UnsafeNameError`` (a ``ValueError``) says which name and why; the service answers 422.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath


class UnsafeNameError(ValueError):
    """A request-controlled name that would leave its folder (or is not a plain relative path)."""

    def __init__(self, name: str, reason: str, kind: str = "file") -> None:
        super().__init__(f"{kind} name {name!r} is refused: {reason}")
        self.name = name
        self.reason = reason
        self.kind = kind

    def __reduce__(self) -> tuple[object, ...]:
        """Keep every field when the error crosses a process boundary (a Ray replica → the ingress)."""
        return (type(self), (self.name, self.reason, self.kind))


def _unsafe_reason(name: str) -> str | None:
    if not name or not name.strip():
        return "empty"
    if any(unicodedata.category(char) in ("Cc", "Cf", "Cs") for char in name):
        return "contains control or invisible characters"
    if "\\" in name:
        return "contains a backslash (use / between folders)"
    if name.startswith("~"):
        return "starts with ~ (a home folder)"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "is an absolute path"
    parts = name.split("/")
    if any(part in ("..", ".") for part in parts):
        return "contains a '..' or '.' component"
    if any(part == "" for part in parts[:-1]) or name.endswith("/"):
        return "contains an empty path component"
    return None


def check_name(name: str, kind: str = "file") -> str:
    """Return ``name`` if it is a plain relative path; raise :class:`UnsafeNameError` otherwise."""
    if not isinstance(name, str):
        raise UnsafeNameError(repr(name), "not a string", kind)
    for form in (name, unicodedata.normalize("NFKC", name)):
        reason = _unsafe_reason(form)
        if reason is not None:
            if form is not name:
                reason += f" once Unicode-normalised ({form!r})"
            raise UnsafeNameError(name, reason, kind)
    return name


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def resolve_inside(root: str | os.PathLike[str], name: str, kind: str = "file") -> Path:
    """``root / name`` with symlinks followed, refused unless it stays inside ``root``.

    The file need not exist (callers check); the returned path is the real one, so opening it
    cannot be redirected by a symlink swapped in between.
    """
    check_name(name, kind)
    real_root = Path(root).resolve()
    real = (real_root / name).resolve()
    if not _inside(real, real_root):
        raise UnsafeNameError(name, "resolves outside its folder (a symlink pointing out?)", kind)
    return real


def files_inside(root: str | os.PathLike[str], suffixes: Sequence[str] = ()) -> Iterator[tuple[str, Path]]:
    """(name relative to ``root`` with /, real path) of every file below ``root`` that stays inside it.

    Symlinks are followed only where they point inside ``root``; others are skipped. Sorted.
    """
    real_root = Path(root).resolve()
    if not real_root.is_dir():
        return
    found: list[tuple[str, Path]] = []
    for directory, folders, files in os.walk(real_root, followlinks=False):
        for file_name in files:
            path = Path(directory) / file_name
            if suffixes and path.suffix.lower() not in suffixes:
                continue
            real = path.resolve()
            if _inside(real, real_root) and real.is_file():
                found.append((path.relative_to(real_root).as_posix(), real))
        folders.sort()
    yield from sorted(found)
