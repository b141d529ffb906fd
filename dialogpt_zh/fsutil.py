"""Atomic file and directory writes: a failed or interrupted run never leaves half an output."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temp directory beside `final`; on success it replaces `final` in one rename.

    On any exception the temp directory is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_file(path: str | Path, field: str, inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse, before any work, an output file that could not be written: a directory, a parent that is a
    file or not writable, or one of the run's `inputs` (never write into an input). Creates nothing."""
    from dialogpt_zh.errors import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError("is a directory; give a file path to write", path=path, field=field)
    resolved = path.resolve()
    for src in inputs:
        src = Path(src).resolve()
        if resolved == src or src in resolved.parents:
            raise UserError(f"would write over or inside the input {src}", path=path, field=field)
    parent = resolved.parent
    while not parent.exists():  # the missing folders would be created: the first existing one must be writable
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{parent} is not a directory", path=path, field=field)
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"not writable (permission denied in {parent})", path=path, field=field)
    return path


def atomic_write_many(files: dict[str | Path, bytes]) -> None:
    """Write several files as one step: every temp file first, then the renames; on any error or interrupt
    before the renames the temp files are removed and every target is left as it was."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        while temps:
            tmp, path = temps[0]
            os.replace(tmp, path)
            temps.pop(0)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
