"""Request-controlled names stay inside their folder: .., absolute paths, symlinks, odd encodings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from facedetailer.safe_paths import UnsafeNameError, check_name, files_inside, resolve_inside

ESCAPES = [
    "..",
    "../secret",
    "styles/../../secret",
    "/etc/passwd",
    "//server/share/x",
    "\\\\server\\share\\x",
    "C:\\Windows\\win.ini",
    "C:relative",
    "..\\secret",
    "~/.ssh/id_rsa",
    "~root",
    "ok/./x",
    "a//b",
    "trailing/",
    "",
    "   ",
    "nul\x00byte",
    "line\nbreak",
    "zero\u200bwidth",  # an invisible character
    "\uff0e\uff0e\uff0fsecret",  # fullwidth "../" (NFKC → "../secret")
    "\u2025/secret",  # TWO DOT LEADER (NFKC → "..")
    "\ufe52\ufe52/secret",  # SMALL FULL STOP ×2 (NFKC → "..")
    "a\uff3c..\uff3cb",  # fullwidth backslashes around ..
]


@pytest.mark.parametrize("name", ESCAPES)
def test_names_that_could_leave_the_folder_are_refused(name):
    with pytest.raises(UnsafeNameError) as caught:
        check_name(name, "LoRA")
    assert caught.value.name == name and "LoRA name" in str(caught.value) and caught.value.reason


@pytest.mark.parametrize(
    "name", ["detail", "styles/anime v2", "détail_ñ", "a.b.c.safetensors", "%2e%2e%2fsecret", "日本"]
)
def test_plain_names_pass(name):
    assert check_name(name) == name


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path)


def make_tree(tmp_path: Path) -> Path:
    """root/ with a file, a nested file, a symlink out, a symlink in, and a linked folder out."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "styles").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (root / "plain.txt").write_text("plain")
    (root / "styles" / "anime.txt").write_text("anime")
    os.symlink(outside / "secret.txt", root / "escape.txt")
    os.symlink(root / "plain.txt", root / "alias.txt")
    os.symlink(outside, root / "linked")
    return root


def test_resolve_inside_follows_symlinks_only_where_they_stay_inside(tree: Path):
    assert resolve_inside(tree, "styles/anime.txt") == (tree / "styles" / "anime.txt").resolve()
    assert resolve_inside(tree, "alias.txt") == (tree / "plain.txt").resolve()
    assert resolve_inside(tree, "missing.txt").parent == tree.resolve()  # need not exist
    assert resolve_inside(tree, "%2e%2e%2fsecret.txt").parent == tree.resolve()  # not decoded: a literal name
    for name in ("escape.txt", "linked/secret.txt"):
        with pytest.raises(UnsafeNameError, match="resolves outside"):
            resolve_inside(tree, name, "wildcard")
    for name in ("../outside/secret.txt", str(tree.parent / "outside" / "secret.txt")):
        with pytest.raises(UnsafeNameError):
            resolve_inside(tree, name)


def test_files_inside_lists_only_files_that_stay_inside(tree: Path):
    names = [name for name, _ in files_inside(tree, (".txt",))]
    assert names == ["alias.txt", "plain.txt", "styles/anime.txt"]
    assert all(path.resolve().is_relative_to(tree.resolve()) for _, path in files_inside(tree))
    assert list(files_inside(tree / "no-such-folder")) == []
