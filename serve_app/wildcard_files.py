"""Wildcard files from a folder (``args.wildcards_dir``): ``__name__`` draws a line of ``name.txt``.

The folder is the operator's; the names come from requests. Names are the files' paths relative
to the folder without ``.txt`` (``hair/colour`` for ``hair/colour.txt``), listed with
:func:`facedetailer.safe_paths.files_inside` — a symlink pointing out of the folder is not a
wildcard — and a name looked up directly goes through
:func:`facedetailer.safe_paths.resolve_inside`, so no request can read a file elsewhere.
Files are read as UTF-8 (undecodable bytes replaced) and re-read when they change.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from facedetailer.safe_paths import files_inside, resolve_inside

SUFFIX = ".txt"


class WildcardFolder(Mapping[str, list[str]]):
    """A read-only mapping name → lines over the ``.txt`` files of a folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"wildcards_dir {self.root} is not a folder")
        self._cache: dict[Path, tuple[int, list[str]]] = {}

    def _paths(self) -> dict[str, Path]:
        return {name.removesuffix(SUFFIX): path for name, path in files_inside(self.root, (SUFFIX,))}

    def _read(self, path: Path) -> list[str]:
        stamp = path.stat().st_mtime_ns
        cached = self._cache.get(path)
        if cached is None or cached[0] != stamp:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            cached = self._cache[path] = (stamp, lines)
        return cached[1]

    def __getitem__(self, name: str) -> list[str]:
        path = resolve_inside(self.root, f"{name}{SUFFIX}", kind="wildcard")
        if not path.is_file():
            raise KeyError(name)
        return self._read(path)

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths())

    def __len__(self) -> int:
        return len(self._paths())

    def items(self) -> list[tuple[str, list[str]]]:  # type: ignore[override]  # one listing, one read each
        return [(name, self._read(path)) for name, path in self._paths().items()]
