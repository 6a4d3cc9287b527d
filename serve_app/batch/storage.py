"""Where a bulk job reads and writes: any filesystem pyarrow knows, and writes that are all or nothing.

A location is a URI (``s3://bucket/photos``, ``gs://…``, ``hdfs://…``, ``file:///…``) or a local
path, resolved with :func:`pyarrow.fs.FileSystem.from_uri`; S3 credentials and endpoint come
from the usual AWS variables (``AWS_ENDPOINT_URL`` for MinIO or moto) or the URI's query
(``?endpoint_override=…&scheme=http``).

:func:`write_atomic` never leaves a half-written file under its final name:

- local disk: the bytes go to a hidden temporary name in the same folder, are flushed to disk
  (``fsync``), then renamed over the final name (``os.replace``, atomic on POSIX); a crash leaves
  at most a hidden ``.<name>.<hex>.partial`` file, which :func:`remove_partial_files` deletes;
- object stores (S3, GCS, Azure): the complete bytes go up in one request, and an object store
  only shows an object once its upload is complete (S3 is opened with ``allow_delayed_open``, so
  an object under the multipart threshold is one ``PUT``; a larger one is a multipart upload,
  visible only once completed);
- other filesystems (HDFS): temporary name, then ``move``.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow.fs as pafs

OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})
PARTIAL_SUFFIX = ".partial"
_PARTIAL_NAME = re.compile(r"^\..+\.[0-9a-f]{32}\.partial$")


class StorageError(ValueError):
    """A location that cannot be used (unknown scheme, missing file, not a folder)."""


@dataclass(frozen=True)
class Location:
    """A folder or file on a filesystem: ``path`` inside ``filesystem``, ``uri`` as shown to people."""

    filesystem: pafs.FileSystem
    path: str
    uri: str

    def join(self, relative: str) -> str:
        """The filesystem path of ``relative`` (``/``-separated) under this location."""
        return f"{self.path}/{relative}" if relative else self.path

    def display(self, path: str) -> str:
        """How a filesystem path under this location is shown (and recorded in the manifest)."""
        scheme = urlsplit(self.uri).scheme if "://" in self.uri else ""
        return path if scheme in ("", "file") else f"{scheme}://{path}"

    @property
    def is_object_store(self) -> bool:
        return self.filesystem.type_name in OBJECT_STORES


def resolve(uri: str, filesystem: pafs.FileSystem | None = None) -> Location:
    """A :class:`Location` for a URI or local path (``filesystem`` overrides the URI's)."""
    text = str(uri)
    if filesystem is not None:  # the path inside it: what follows the scheme, without a query
        parts = urlsplit(text) if "://" in text else None
        path = text if parts is None else f"{parts.netloc}{parts.path}"
        if isinstance(filesystem, pafs.LocalFileSystem):
            path = os.path.abspath(os.path.expanduser(text if parts is None else parts.path))
        return Location(filesystem, _strip(path), text)
    if "://" not in text:
        return Location(pafs.LocalFileSystem(), _strip(os.path.abspath(os.path.expanduser(text))), text)
    parts = urlsplit(text)
    if parts.scheme == "s3":
        query = dict(parse_qsl(parts.query))
        query.setdefault("allow_delayed_open", "true")  # a small object is written in one PUT
        text_for_arrow = urlunsplit(parts._replace(query=urlencode(query)))
    else:
        text_for_arrow = text
    try:
        found, path = pafs.FileSystem.from_uri(text_for_arrow)
    except (ValueError, OSError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise StorageError(f"{text}: cannot open this location: {error}") from error
    shown = urlunsplit(parts._replace(query="", fragment=""))
    return Location(found, _strip(path), shown)


def _strip(path: str) -> str:
    return path.rstrip("/") or "/"


def write_atomic(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either absent or complete (see the module docstring)."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        _write_local(path, data)
        return
    parent = path.rsplit("/", 1)[0]
    if filesystem.type_name in OBJECT_STORES:
        with filesystem.open_output_stream(path) as stream:  # the bytes are complete before the request
            stream.write(data)
        return
    filesystem.create_dir(parent, recursive=True)
    temporary = _partial_name(path)
    try:
        with filesystem.open_output_stream(temporary) as stream:
            stream.write(data)
        filesystem.move(temporary, path)
    except BaseException:
        _delete_quietly(filesystem, temporary)
        raise


def _write_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = _partial_name(path)
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before it has the final name
        os.replace(temporary, path)
    except BaseException:
        _delete_quietly(pafs.LocalFileSystem(), temporary)
        raise


def _partial_name(path: str) -> str:
    folder, _, name = path.rpartition("/")
    return f"{folder}/.{name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"


def _delete_quietly(filesystem: pafs.FileSystem, path: str) -> None:
    try:
        filesystem.delete_file(path)
    except (FileNotFoundError, OSError):
        pass


def read_bytes(filesystem: pafs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def exists(filesystem: pafs.FileSystem, path: str) -> bool:
    return filesystem.get_file_info(path).type == pafs.FileType.File


def list_files(location: Location, *, recursive: bool = True) -> list[pafs.FileInfo]:
    """Every file under ``location`` (none if it does not exist)."""
    selector = pafs.FileSelector(location.path, recursive=recursive, allow_not_found=True)
    return [info for info in location.filesystem.get_file_info(selector) if info.type == pafs.FileType.File]


def is_partial_file(name: str) -> bool:
    """A temporary file :func:`write_atomic` left behind when its process died before the rename."""
    return bool(_PARTIAL_NAME.match(name))


def remove_partial_files(location: Location) -> int:
    """Delete temporaries of interrupted writes under ``location``; return how many."""
    removed = 0
    for info in list_files(location):
        if is_partial_file(info.base_name):
            _delete_quietly(location.filesystem, info.path)
            removed += 1
    return removed
