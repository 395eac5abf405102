"""Local paths and gs:// URLs behind one API (`etils.epath`), for every file the project reads
or writes.

An object store has no append and no atomic rename, but an object only appears once its upload
is complete. So `open_atomic` / `write_*` write a remote object directly and a local file
through a temporary name and a rename: either way a reader sees the old content or the new
one, never half a file. gs:// goes through gcsfs, which honours `STORAGE_EMULATOR_HOST`.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator, Sequence

from etils import epath

from mta_jax.errors import StorageError

PathLike = str | os.PathLike


def is_remote(p: PathLike) -> bool:
    """True for a URL (gs://...), False for a local path."""
    return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
    """`p` as an epath.Path; a local `~` is expanded."""
    return epath.Path(p if is_remote(p) else os.path.expanduser(os.fspath(p)))


def absolute(p: PathLike) -> epath.Path:
    """A URL as is; a local path made absolute (Orbax and tensorstore need one)."""
    return path(p) if is_remote(p) else epath.Path(os.path.abspath(path(p)))


def makedirs(p: PathLike) -> epath.Path:
    """`p`, ready to hold files. Local folders are created; an object store has no folders,
    but its bucket must exist: checked here, so that a mistyped one is one error line before
    the run starts rather than a traceback at its first write."""
    target = path(p)
    if not is_remote(target):
        target.mkdir(parents=True, exist_ok=True)
        return target
    scheme, rest = os.fspath(target).split("://", 1)
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    if not path(bucket).exists():
        raise StorageError(f"{bucket} does not exist, or these credentials cannot read it "
                           f"(writing {target})")
    return target


@contextlib.contextmanager
def open_atomic(p: PathLike) -> Iterator[Any]:
    """A binary file to write `p` through: nothing of it shows unless the block ends cleanly."""
    target = path(p)
    if is_remote(target):
        f = target.open("wb")
        try:
            yield f
        except BaseException:
            # fsspec uploads on close(): mark the file closed, so that neither this block nor
            # garbage collection publishes a partial object. Cancelling an upload already under
            # way is a courtesy: an unfinished upload is never published either.
            with contextlib.suppress(Exception):
                f.discard()
            f.closed = True
            raise
        f.close()
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            yield f
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(p: PathLike, data: bytes) -> epath.Path:
    with open_atomic(p) as f:
        f.write(data)
    return path(p)


def write_text(p: PathLike, text: str) -> epath.Path:
    return write_bytes(p, text.encode("utf-8"))


def write_json(p: PathLike, obj: Any, **dump_kwargs) -> epath.Path:
    return write_text(p, json.dumps(obj, **dump_kwargs))


def read_text(p: PathLike) -> str:
    return path(p).read_bytes().decode("utf-8")


def read_json(p: PathLike) -> Any:
    return json.loads(path(p).read_bytes())


def read_range(p: PathLike, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file, local or remote; remotely one ranged request, so that a
    large object can be read piece by piece without downloading it."""
    if is_remote(p):
        import fsspec  # pylint: disable=g-import-not-at-top  (what epath itself uses)
        fs, key = fsspec.core.url_to_fs(os.fspath(p))
        return fs.cat_file(key, start=start, end=end)
    with open(path(p), "rb") as f:
        f.seek(start)
        return f.read(end - start)


def local_copy(folder: PathLike, skip_suffixes: Sequence[str] = ()) -> str:
    """A local folder holding the files of `folder` (itself when local), without those whose
    name ends with one of `skip_suffixes`: for libraries that read local files only."""
    if not is_remote(folder):
        return os.fspath(path(folder))
    local = tempfile.mkdtemp(prefix="mta_jax_")
    for src in path(folder).iterdir():
        if src.is_file() and not src.name.endswith(tuple(skip_suffixes)):
            (epath.Path(local) / src.name).write_bytes(src.read_bytes())
    return local
