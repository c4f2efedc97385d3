"""Where an index lives: a local directory or a `pyarrow.fs` URI (s3://, gs://, ...).

`IndexStore` is the only code that touches index files. It reads `CURRENT` and
manifests, and writes files atomically: on a local disk through a temporary
file in the same directory, fsync, rename, fsync of the directory (so a crash
leaves either the old or the new file, never half of one); on an object store
each key is written once with a single put, which the store makes atomic.

Every path stays inside the index root, whatever is on disk: a relative path goes
through `manifest.check_relative_path` (nothing a manifest says can name `..` or an
absolute path), and on a local disk every component of it below the root is checked
with `lstat` before it is read, written, listed or deleted: a symbolic link under the
root is refused (`IndexPathError`), never followed, and the last component is opened
with O_NOFOLLOW. A link under `shards/` once let garbage collection delete files of
another folder; an operator who wants the index elsewhere links the root itself.
"""
from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import stat
from dataclasses import dataclass
from typing import Iterator

import pyarrow.fs as pafs

from facepq_core.atomic import atomic_writer
from facepq_core.errors import IndexFormatError
from indexer.errors import IndexPathError, storage_error
from indexer.manifest import Manifest, check_relative_path

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
MANIFEST_DIR = "manifests"
SHARD_DIR = "shards"
LOCK_FILE = "_lock"


def manifest_path(version: int) -> str:
    return f"{MANIFEST_DIR}/{version:08d}.json"


@dataclass(frozen=True)
class FileEntry:
    """A file under the index root: path relative to the root, size in bytes, mtime in epoch seconds."""

    path: str
    size: int
    mtime: float


class IndexStore:
    """An index root on a local disk or object store.

    Args:
        uri: a local path (relative or absolute) or a URI `pyarrow.fs.FileSystem.from_uri` understands.
        filesystem: use this pyarrow FileSystem, with `uri` as the root path inside it (e.g. an
            S3FileSystem with custom credentials/endpoint). Anything but a LocalFileSystem is treated
            as an object store: write-once puts, no memory-mapping, a Redis commit lock.
    """

    def __init__(self, uri: str | os.PathLike, filesystem: pafs.FileSystem | None = None):
        uri = os.fspath(uri)
        if not uri:
            raise IndexFormatError("index path is empty")
        self.uri = uri
        if filesystem is not None:
            self.fs, self.root = filesystem, uri.rstrip("/")
        elif "://" not in uri:
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self.root = os.path.abspath(uri)
        else:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(uri)
            except (ValueError, OSError) as exc:
                raise IndexFormatError(f"cannot open index location {uri!r}: {exc}") from exc
            self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"IndexStore({self.uri!r})"

    # ---- paths -------------------------------------------------------------
    def full_path(self, rel: str) -> str:
        """Absolute path (local) or bucket key (object store) of `rel`, refused if it leaves the root.

        Raises:
            IndexFormatError: `rel` is not a normalised relative path.
            IndexPathError: on a local disk, a component of `rel` that exists is a symbolic link.
        """
        rel = check_relative_path(rel)
        if self.is_local:
            self._refuse_links(rel)
        return f"{self.root}/{rel}"

    def _refuse_links(self, rel: str) -> None:
        """lstat every existing component of `rel` below the root; a symbolic link is refused."""
        here = self.root
        parts = rel.split("/")
        for i, part in enumerate(parts):
            here = f"{here}/{part}"
            try:
                mode = os.lstat(here).st_mode
            except FileNotFoundError:
                return  # nothing below a missing component exists either
            except NotADirectoryError:
                return
            if stat.S_ISLNK(mode):
                raise IndexPathError(_link_message(self.uri, "/".join(parts[:i + 1])))

    def check_no_links(self) -> None:
        """Refuse an index holding a symbolic link anywhere under `manifests/`, `shards/` or at its top level.

        Servers and garbage collection call this before they start, so an index that could lead them
        outside its root is refused with one message instead of being half served or half collected.
        """
        if not self.is_local:
            return
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.is_symlink():
                raise IndexPathError(_link_message(self.uri, entry.name))
        for top in (MANIFEST_DIR, SHARD_DIR):
            self.list_files(top)

    def local_path(self, rel: str) -> str | None:
        """OS path of `rel` when the index is on a local disk (for memory-mapping), else None."""
        return self.full_path(rel) if self.is_local else None

    # ---- reading -----------------------------------------------------------
    def file_exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.full_path(rel)).type == pafs.FileType.File

    def open_local(self, rel: str) -> int:
        """A read-only descriptor of the local file `rel`, never through a link (O_NOFOLLOW)."""
        return os.open(self.full_path(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def read_bytes(self, rel: str) -> bytes:
        try:
            if self.is_local:
                with open(self.open_local(rel), "rb") as f:
                    return f.read()
            with self.fs.open_input_stream(self.full_path(rel)) as f:
                return f.read()
        except FileNotFoundError as exc:
            raise IndexFormatError(f"{self.uri}: missing file {rel}") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link created after the check
                raise IndexPathError(_link_message(self.uri, rel)) from exc
            raise

    def exists(self) -> bool:
        """True when an index has been committed here (a CURRENT pointer exists)."""
        return self.file_exists(CURRENT)

    def current_version(self) -> int | None:
        """The committed version `CURRENT` points at, or None when no index exists here yet."""
        if self.is_local:
            # One open and read (~10 us), not a file-info call plus a stream (~60 us): the
            # coordinator reads this on every search. CURRENT is replaced by rename, never rewritten.
            try:
                with open(self.open_local(CURRENT), "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                return None
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise IndexPathError(_link_message(self.uri, CURRENT)) from exc
                raise
        elif not self.exists():
            return None
        else:
            raw = self.read_bytes(CURRENT)
        text = raw.decode("ascii", "replace").strip()
        if not text.isdigit() or int(text) < 1:
            raise IndexFormatError(f"{self.uri}/CURRENT is corrupt (contains {text[:40]!r}, expected a version number)")
        return int(text)

    def load_manifest(self, version: int | None = None) -> Manifest:
        """Read the manifest of `version` (default: the current one).

        Raises:
            IndexFormatError: no index here, the manifest is missing or corrupt, or of a newer format.
        """
        if version is None:
            version = self.current_version()
            if version is None:
                raise IndexFormatError(f"no facepq index at {self.uri} (no CURRENT file); "
                                       f"create one with `facepq ingest --index {self.uri} ...`")
        rel = manifest_path(version)
        if not self.file_exists(rel):
            raise IndexFormatError(f"{self.uri}: manifest of version {version} ({rel}) is missing")
        manifest = Manifest.from_json(self.read_bytes(rel), source=f"{self.uri}/{rel}")
        if manifest.version != version:
            raise IndexFormatError(f"{self.uri}/{rel} claims version {manifest.version}; the index is corrupt")
        return manifest

    def list_files(self, prefix: str) -> list[FileEntry]:
        """All files under the directory `prefix` (recursively); empty if it does not exist.

        Raises:
            IndexPathError: a symbolic link under `prefix` on a local disk (never descended into).
        """
        base = self.full_path(prefix)
        if self.is_local:
            return self._list_local(prefix, base)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except FileNotFoundError:
            return []
        out = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[len(self.root) + 1:] if info.path.startswith(self.root + "/") else info.path
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            out.append(FileEntry(rel, info.size or 0, mtime))
        return sorted(out, key=lambda e: e.path)

    def _list_local(self, prefix: str, base: str) -> list[FileEntry]:
        out: list[FileEntry] = []
        stack = [(prefix, base)]
        while stack:
            rel_dir, path = stack.pop()
            try:
                entries = list(os.scandir(path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}"
                if entry.is_symlink():
                    raise IndexPathError(_link_message(self.uri, rel))
                if entry.is_dir(follow_symlinks=False):
                    stack.append((rel, entry.path))
                elif entry.is_file(follow_symlinks=False):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # renamed or removed since the directory was read (a
                        continue               # writer publishing its temporary file): not there now
                    out.append(FileEntry(rel, st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e.path)

    # ---- writing -----------------------------------------------------------
    @contextlib.contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """Turn an OSError of the block into the error a caller can act on (indexer.errors.storage_error):
        a full disk, a read-only index, an I/O error, each one line naming the index."""
        try:
            yield
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise
            raise storage_error(exc, self.uri, what) from exc

    def makedirs(self, rel: str) -> None:
        path = self.full_path(rel)
        with self.writing(f"creating {rel}"):
            self.fs.create_dir(path, recursive=True)

    @contextlib.contextmanager
    def open_atomic(self, rel: str) -> Iterator[io.RawIOBase]:
        """Yield a binary file; its content appears at `rel` only if the block finishes without error.

        Local: `facepq_core.atomic.atomic_writer` (temporary file beside the target, fsync, rename over
        the target, fsync of the directory; on failure the temporary file is removed).
        Object store: bytes are buffered and written with one put (a key is never seen half written).
        """
        target = self.full_path(rel)
        if self.is_local:
            with self.writing(f"writing {rel}"), atomic_writer(target) as f:
                yield f
        else:
            buf = io.BytesIO()
            yield buf
            parent = os.path.dirname(rel)
            if parent:
                self.makedirs(parent)
            with self.fs.open_output_stream(target) as out:
                out.write(buf.getvalue())

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomically write `data` to `rel` (see `open_atomic`)."""
        with self.open_atomic(rel) as f:
            f.write(data)

    def write_manifest(self, manifest: Manifest) -> str:
        """Write `manifests/<version>.json`; it is not current until `set_current`."""
        rel = manifest_path(manifest.version)
        self.write_bytes(rel, manifest.to_json().encode("utf-8"))
        return rel

    def set_current(self, version: int) -> None:
        """Atomically make `version` the current one (the commit point)."""
        self.write_bytes(CURRENT, f"{version}\n".encode("ascii"))

    def delete(self, rel: str) -> None:
        """Remove the file `rel` (a no-op when it is gone); a local link is refused, never followed."""
        path = self.full_path(rel)
        with self.writing(f"deleting {rel}"), contextlib.suppress(FileNotFoundError):  # gone is fine
            if self.is_local:
                os.unlink(path)
            else:
                self.fs.delete_file(path)


def _link_message(uri: str, rel: str) -> str:
    return (f"{uri}/{rel} is a symbolic link: facepq never follows links inside an index (reading, writing or "
            f"garbage-collecting through one could reach files outside the index); replace it with the real "
            f"file or folder, or link the index root itself")

