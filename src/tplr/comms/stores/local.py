"""``LocalStore``: the :class:`~tplr.comms.stores.base.ObjectStore` on a local directory.

It is the embedded default when no bucket keys are set, and it behaves like R2 where the
transfer engine can tell: keys are ``/``-separated, ``put`` and ``complete_multipart``
publish atomically, ETags are MD5-based (hex MD5 for a single put,
``md5(concat(part md5 digests))-N`` for multipart), multipart parts must all be the same
size except a smaller last one, and a missing key raises ``NotFound``.

Layout under ``root``::

    <key>                                 the objects themselves, as plain files
    .tplr-store/meta/<key>.json           ETag index: {"etag", "size", "mtime_ns", "ino"}
    .tplr-store/uploads/<id>/key          multipart upload in progress: its key ...
    .tplr-store/uploads/<id>/NNNNN-<md5>.part   ... and its parts, named by number and MD5
    .tplr-store/tmp/                      files being written (renamed into place when done)

The ETag index entry is trusted only while the file's size, mtime and inode match it; a
file placed in ``root`` by other means is hashed once, on first ``head``/``list``, and the
result cached (best effort: a read-only root simply hashes again next time). Keys that
are absolute, contain ``..``/``.``/empty segments, backslashes or NUL, start with
``.tplr-store`` or resolve (through symlinks) outside ``root`` raise ``InvalidRequest``.
All file I/O runs in worker threads (``asyncio.to_thread``), never on the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from tplr.comms.diskspace import FreeSpaceProbe, free_bytes
from tplr.comms.errors import (
    AccessDenied,
    AlreadyExists,
    InsufficientSpace,
    InvalidRequest,
    NotFound,
    PreconditionFailed,
    StoreError,
    TransientError,
)
from tplr.comms.stores.base import CompletedPart, ObjectInfo

T = TypeVar("T")
log = logging.getLogger(__name__)

INTERNAL_DIR = ".tplr-store"
MAX_KEY_BYTES = 1024
MAX_PART_NUMBER = 10_000
_HASH_CHUNK = 8 * 1024 * 1024


def validate_key(key: str, *, prefix: bool = False) -> None:
    """Refuse keys that could address anything outside the store's root."""
    what = "prefix" if prefix else "key"
    if not isinstance(key, str) or (not key and not prefix):
        raise InvalidRequest(
            f"invalid {what} {key!r}: must be a non-empty string",
            hint="use a relative, '/'-separated key such as 'dataset/train_000000.npy'",
        )
    problem = None
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        problem = f"longer than {MAX_KEY_BYTES} bytes"
    elif "\x00" in key:
        problem = "contains a NUL character"
    elif "\\" in key:
        problem = "contains a backslash; use '/' to separate segments"
    elif key.startswith("/"):
        problem = "is an absolute path; keys are relative to the store"
    else:
        segments = key.split("/")
        if prefix:
            segments = segments[:-1]  # a prefix may end in '/' or in a partial name
        if any(s in (".", "..") for s in segments):
            problem = "contains a '.' or '..' segment"
        elif any(s == "" for s in segments):
            problem = "contains an empty segment ('//' or a trailing '/')"
        elif key.split("/")[0] == INTERNAL_DIR:
            problem = f"starts with the reserved name {INTERNAL_DIR!r}"
    if problem:
        raise InvalidRequest(
            f"invalid {what} {key!r}: it {problem}",
            hint="use a relative, '/'-separated key such as 'dataset/train_000000.npy'",
        )


def _utc(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime_ns / 1e9, UTC)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def multipart_etag(part_md5_hex: list[str]) -> str:
    """The S3/R2 ETag of a multipart object: ``md5(concat(part md5 digests))-N``."""
    joined = b"".join(bytes.fromhex(d) for d in part_md5_hex)
    return f"{hashlib.md5(joined).hexdigest()}-{len(part_md5_hex)}"


class LocalStore:
    """A directory of objects. ``async with`` is optional (there is nothing to close)."""

    def __init__(self, root: Path | str, *, free_space_probe: FreeSpaceProbe | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        self._internal = self.root / INTERNAL_DIR
        self._probe = free_space_probe or free_bytes

    def __repr__(self) -> str:
        return f"LocalStore(root={str(self.root)!r})"

    def url(self, key: str = "") -> str:
        return f"file://{self.root.as_posix()}/{key}"

    async def __aenter__(self) -> LocalStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        return None

    # -- plumbing -------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        validate_key(key)
        path = self.root / key
        if not path.resolve().is_relative_to(self.root):
            raise InvalidRequest(
                f"key {key!r} resolves outside the store root {self.root} (through a symlink)",
                location=self.url(key),
                hint="remove the symlink or store the object inside the root",
            )
        return path

    def _meta_path(self, key: str) -> Path:
        return self._internal / "meta" / f"{key}.json"

    async def _run(
        self,
        operation: str,
        key: str,
        func: Callable[..., T],
        *args: Any,
        writing: bool = False,
        needed_bytes: int = 0,
    ) -> T:
        try:
            return await asyncio.to_thread(func, *args)
        except OSError as exc:
            error = self._os_error(exc, operation, key, writing=writing, needed_bytes=needed_bytes)
            raise error from exc

    def _no_space(self, key: str, needed_bytes: int, free: int | None = None) -> InsufficientSpace:
        where = str(self.root / key) if key else str(self.root)
        if free is None:  # the disk said ENOSPC: what statvfs sees now
            free = free_bytes(self.root) if self.root.exists() else 0
        return InsufficientSpace(
            where,
            needed_bytes,
            free,
            hint=f"free disk space under {self.root} or move the store to a larger disk",
        )

    def _preflight(self, key: str, needed_bytes: int) -> None:
        """Refuse a write the disk cannot hold before a byte of it is written."""
        self._internal.mkdir(parents=True, exist_ok=True)
        if needed_bytes > 0 and (free := self._probe(self.root)) < needed_bytes:
            raise self._no_space(key, needed_bytes, free)

    def _write_tmp(self, chunks: list[Any] | bytes) -> Path:
        """A fsynced temp file holding ``chunks``; removed again if writing it fails."""
        tmp = self._new_tmp()
        try:
            with open(tmp, "wb") as fh:
                for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _os_error(
        self, exc: OSError, operation: str, key: str, *, writing: bool, needed_bytes: int = 0
    ) -> StoreError:
        location = self.url(key)
        where = f"{operation} {location}"
        if isinstance(exc, PermissionError):
            return AccessDenied(
                f"permission denied: {where}: {exc.strerror}",
                location=location,
                hint=f"check the file permissions under {self.root}",
            )
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return self._no_space(key, needed_bytes)
        conflict = isinstance(exc, IsADirectoryError | NotADirectoryError | FileExistsError)
        if writing and conflict:
            return InvalidRequest(
                f"{where}: the key conflicts with an existing object or folder ({exc.strerror})",
                location=location,
                hint="a local store cannot hold both 'a' and 'a/b'; choose another key",
            )
        if isinstance(exc, FileNotFoundError) or conflict:
            return NotFound(f"key not found: {where}", location=location)
        return TransientError(f"{where} failed: {exc}", location=location)

    def _new_tmp(self) -> Path:
        tmp_dir = self._internal / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        return tmp_dir / f"{uuid.uuid4().hex}.tmp"

    def _publish(self, tmp: Path, key: str, etag: str) -> ObjectInfo:
        """Rename a complete, fsynced temp file to ``key`` and record its ETag."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.replace(path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        st = path.stat()
        self._cache_meta(key, etag, st)
        return ObjectInfo(key=key, size=st.st_size, etag=etag, last_modified=_utc(st))

    def _cache_meta(self, key: str, etag: str, st: os.stat_result) -> None:
        """Record the ETag (a cache: if the disk is full now, it is recomputed later)."""
        try:
            self._write_meta(key, etag, st)
        except OSError as exc:
            log.debug("could not cache the ETag of %s: %s", self.url(key), exc)

    def _write_meta(self, key: str, etag: str, st: os.stat_result) -> None:
        meta = {"etag": etag, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
        target = self._meta_path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._new_tmp()
        try:
            tmp.write_text(json.dumps(meta), encoding="utf-8")
            tmp.replace(target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _etag(self, key: str, st: os.stat_result, fd: int | None = None) -> str:
        """The cached ETag if it still describes this file, else the file's MD5 (cached)."""
        try:
            meta = json.loads(self._meta_path(key).read_text(encoding="utf-8"))
            if (meta["size"], meta["mtime_ns"], meta["ino"]) == (
                st.st_size,
                st.st_mtime_ns,
                st.st_ino,
            ):
                return str(meta["etag"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no usable index entry: hash the file below
        etag = self._hash_file(key, fd)
        self._cache_meta(key, etag, st)
        return etag

    def _info(self, key: str, st: os.stat_result) -> ObjectInfo:
        return ObjectInfo(
            key=key, size=st.st_size, etag=self._etag(key, st), last_modified=_utc(st)
        )

    def _hash_file(self, key: str, fd: int | None) -> str:
        own_fd = fd is None
        if fd is None:
            fd = os.open(self._path(key), os.O_RDONLY)
        try:
            hasher = hashlib.md5()
            offset = 0
            while chunk := os.pread(fd, _HASH_CHUNK, offset):
                hasher.update(chunk)
                offset += len(chunk)
            return hasher.hexdigest()
        finally:
            if own_fd:
                os.close(fd)

    # -- reads ----------------------------------------------------------------------------

    async def head(self, key: str) -> ObjectInfo:
        return await self._run("HEAD", key, self._head_sync, key)

    def _head_sync(self, key: str) -> ObjectInfo:
        st = self._path(key).stat()
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(errno.ENOENT, "not a file")
        return self._info(key, st)

    async def get_range(
        self, key: str, offset: int, into: memoryview, *, if_match: str | None = None
    ) -> None:
        if offset < 0:
            raise InvalidRequest(f"negative offset {offset} for {self.url(key)}")
        await self._run("GET", key, self._get_range_sync, key, offset, into, if_match)

    def _get_range_sync(
        self, key: str, offset: int, into: memoryview, if_match: str | None
    ) -> None:
        fd = os.open(self._path(key), os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(errno.ENOENT, "not a file")
            if if_match is not None and (etag := self._etag(key, st, fd)) != if_match.strip('"'):
                raise PreconditionFailed(
                    f"object changed: {self.url(key)} has ETag {etag}, expected {if_match}",
                    location=self.url(key),
                )
            if len(into) and offset >= st.st_size:
                raise InvalidRequest(
                    f"range not satisfiable: offset {offset} is beyond the end of"
                    f" {self.url(key)} ({st.st_size} bytes)",
                    location=self.url(key),
                )
            received = 0
            while received < len(into):
                n = os.preadv(fd, [into[received:]], offset + received)
                if n == 0:
                    break
                received += n
        finally:
            os.close(fd)
        if received < len(into):
            raise TransientError(
                f"short read: {self.url(key)} bytes {offset}-{offset + len(into) - 1}:"
                f" got {received} of {len(into)} bytes",
                location=self.url(key),
            )

    async def get(self, key: str) -> bytes:
        return await self._run("GET", key, self._get_sync, key)

    def _get_sync(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(errno.ENOENT, "not a file")
        return path.read_bytes()

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        validate_key(prefix, prefix=True)
        for info in await self._run("LIST", prefix, self._list_sync, prefix):
            yield info

    def _list_sync(self, prefix: str) -> list[ObjectInfo]:
        base = self.root / prefix.rpartition("/")[0]
        if not base.is_dir():
            return []
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(base):
            here = Path(dirpath)
            if here == self.root:
                dirnames[:] = [d for d in dirnames if d != INTERNAL_DIR]
            for name in filenames:
                key = (here / name).relative_to(self.root).as_posix()
                if key.startswith(prefix) and (info := self._list_entry(key)) is not None:
                    found.append(info)
        found.sort(key=lambda info: info.key)
        return found

    def _list_entry(self, key: str) -> ObjectInfo | None:
        """The entry for ``key``, or None for what a listing skips (symlink escapes,
        sockets, files that vanished meanwhile)."""
        try:
            st = self._path(key).stat()
        except (InvalidRequest, OSError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return self._info(key, st)

    # -- writes ---------------------------------------------------------------------------

    async def put(self, key: str, data: bytes) -> ObjectInfo:
        return await self._run(
            "PUT", key, self._put_sync, key, data, writing=True, needed_bytes=len(data)
        )

    def _put_sync(self, key: str, data: bytes) -> ObjectInfo:
        self._path(key)  # validate before writing anything
        self._preflight(key, len(data))
        tmp = self._write_tmp(data)
        return self._publish(tmp, key, hashlib.md5(data).hexdigest())

    async def put_if_absent(self, key: str, data: bytes) -> ObjectInfo:
        return await self._run(
            "PUT if absent", key, self._put_if_absent_sync, key, data, needed_bytes=len(data)
        )

    def _put_if_absent_sync(self, key: str, data: bytes) -> ObjectInfo:
        path = self._path(key)
        self._preflight(key, len(data))
        tmp = self._write_tmp(data)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(tmp, path)  # atomic: fails if the key exists
        except FileExistsError:
            raise AlreadyExists(f"{self.url(key)} already exists", location=self.url(key)) from None
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
        st = path.stat()
        etag = hashlib.md5(data).hexdigest()
        self._cache_meta(key, etag, st)
        return ObjectInfo(key=key, size=st.st_size, etag=etag, last_modified=_utc(st))

    async def delete(self, key: str) -> None:
        await self._run("DELETE", key, self._delete_sync, key, writing=True)

    def _delete_sync(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir() and not path.is_symlink():
            return  # a folder is not an object: nothing to delete under this key
        try:
            path.unlink(missing_ok=True)
        except NotADirectoryError:
            return  # 'a/b' where 'a' is an object: there is no 'a/b' to delete
        self._meta_path(key).unlink(missing_ok=True)

    # -- multipart ------------------------------------------------------------------------

    def _upload_dir(self, key: str, upload_id: str) -> Path:
        """The staging folder of an upload in progress for ``key``; NotFound otherwise."""
        validate_key(key)
        if not upload_id.isalnum():
            raise InvalidRequest(f"invalid upload id {upload_id!r}", location=self.url(key))
        folder = self._internal / "uploads" / upload_id
        try:
            recorded = (folder / "key").read_text(encoding="utf-8")
        except FileNotFoundError:
            recorded = None
        if recorded != key:
            raise NotFound(
                f"multipart upload {upload_id} for {self.url(key)} does not exist"
                " (completed, aborted, or never started)",
                location=self.url(key),
                hint="start a new multipart upload",
            )
        return folder

    async def create_multipart(self, key: str) -> str:
        return await self._run("CreateMultipartUpload", key, self._create_sync, key, writing=True)

    def _create_sync(self, key: str) -> str:
        self._path(key)
        upload_id = uuid.uuid4().hex
        folder = self._internal / "uploads" / upload_id
        folder.mkdir(parents=True)
        (folder / "key").write_text(key, encoding="utf-8")
        return upload_id

    async def upload_part(self, key: str, upload_id: str, part_number: int, data: bytes) -> str:
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise InvalidRequest(
                f"part number {part_number} for {self.url(key)} is outside 1..{MAX_PART_NUMBER}"
            )
        return await self._run(
            f"UploadPart {part_number}",
            key,
            self._upload_part_sync,
            key,
            upload_id,
            part_number,
            data,
            writing=True,
            needed_bytes=len(data),
        )

    def _upload_part_sync(self, key: str, upload_id: str, part_number: int, data: bytes) -> str:
        folder = self._upload_dir(key, upload_id)
        etag = hashlib.md5(data).hexdigest()
        self._preflight(key, len(data))
        tmp = self._write_tmp(data)
        final = folder / f"{part_number:05d}-{etag}.part"
        tmp.replace(final)
        for older in folder.glob(f"{part_number:05d}-*.part"):
            if older != final:
                older.unlink(missing_ok=True)  # a re-uploaded part replaces the earlier one
        return etag

    async def complete_multipart(
        self, key: str, upload_id: str, parts: list[CompletedPart]
    ) -> ObjectInfo:
        return await self._run(
            "CompleteMultipartUpload",
            key,
            self._complete_sync,
            key,
            upload_id,
            list(parts),
            writing=True,
        )

    def _complete_sync(self, key: str, upload_id: str, parts: list[CompletedPart]) -> ObjectInfo:
        folder = self._upload_dir(key, upload_id)
        files = self._checked_part_files(key, folder, parts)
        total = sum(f.stat().st_size for f in files)
        self._preflight(key, total)
        tmp = self._new_tmp()
        try:
            with open(tmp, "wb") as out:
                for part_file in files:
                    with open(part_file, "rb") as src:
                        shutil.copyfileobj(src, out, _HASH_CHUNK)
                out.flush()
                os.fsync(out.fileno())
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._no_space(key, total) from exc
            raise
        info = self._publish(tmp, key, multipart_etag([p.etag for p in parts]))
        shutil.rmtree(folder, ignore_errors=True)
        return info

    def _checked_part_files(self, key: str, folder: Path, parts: list[CompletedPart]) -> list[Path]:
        """The part files in order, after the checks S3 and R2 make on completion."""

        def bad(why: str) -> InvalidRequest:
            return InvalidRequest(f"cannot complete {self.url(key)}: {why}", location=self.url(key))

        if not parts:
            raise bad("no parts given")
        numbers = [p.part_number for p in parts]
        if numbers != sorted(set(numbers)):
            raise bad(f"part numbers must be unique and ascending, got {numbers[:10]}")
        files = [folder / f"{p.part_number:05d}-{p.etag.strip(chr(34))}.part" for p in parts]
        missing = [p.part_number for p, f in zip(parts, files, strict=True) if not f.exists()]
        if missing:
            raise bad(f"parts {missing[:10]} were not uploaded or have another ETag")
        sizes = [f.stat().st_size for f in files]
        if any(s != sizes[0] for s in sizes[:-1]) or sizes[-1] > sizes[0]:
            raise bad(
                "all parts but the last must have the same size and the last may not be"
                f" larger (as on R2); got sizes {sizes[:10]}"
            )
        return files

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drop an upload's staged parts. Idempotent, like S3 for an already-gone upload."""
        await self._run("AbortMultipartUpload", key, self._abort_sync, key, upload_id)

    def _abort_sync(self, key: str, upload_id: str) -> None:
        try:
            folder = self._upload_dir(key, upload_id)
        except NotFound:
            return
        shutil.rmtree(folder, ignore_errors=True)
