"""The one way caff writes a file: whole or not at all, and durable once it is there.

`atomic_write` writes the bytes to a temporary file beside the target, flushes and fsyncs it,
renames it over the target (``os.replace``, atomic on POSIX) and fsyncs the folder, so that
after a crash the target holds either its old content or the new one, never a part. The new
file gets the permissions an ordinary ``open`` would give it (0666 less the umask). A failure
(a full disk, say) removes the temporary file and raises an OSError naming the target.
"""

from __future__ import annotations

import os
from pathlib import Path


def _fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` atomically and durably; returns the path."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(handle, view):]
            os.fsync(handle)
        finally:
            os.close(handle)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        error = OSError(f"cannot write {path}: {exc.strerror or exc}")
        error.errno = exc.errno
        raise error from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
