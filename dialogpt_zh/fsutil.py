"""Atomic file and directory writes: a failed or interrupted run never leaves half an output."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

from dialogpt_zh.errors import UserError

log = logging.getLogger(__name__)


def refuse_special_file(path: str | Path, field: str | None = None) -> None:
    """UserError when `path` (or what its link points to) is a device, a pipe or a socket: a rename would put
    a regular file in its place (as root, `--output /dev/null` replaced the system's /dev/null), and
    appending to one fails midway (/dev/full: no space left; a pipe: fsync is refused)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # missing, a dangling link, a NUL: the caller's own checks say so
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UserError("is a device, a pipe or a socket, not a file; give a file path to write", path=path,
                        field=field)


# errors of the output side only (a read never gives them), so a block's failure with one is the output's
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def write_error(e: OSError, path: str | Path) -> UserError:
    """The message for an output that could not be written (a full disk, a read-only file system)."""
    return UserError(f"cannot write the output: {e.strerror or e}; nothing was put in its place", path=path)


def _process_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: done once, at import
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new temp file in `path`'s directory (same file system, so the final rename is atomic)."""
    refuse_special_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes it private (0600): the output gets what open() would give
        return fd, tmp
    except OSError as e:
        raise write_error(e, path) from e


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kw: Any) -> Iterator[IO]:
    """Open a temp file beside `path` for writing; when the block succeeds it is fsynced and renamed over
    `path`, when it fails it is removed (so a streamed output is whole or absent). A write that fails for
    want of space (in the block or at the end) is a UserError naming `path`."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        try:
            with os.fdopen(fd, mode, **kw) as f:
                yield f
                try:
                    f.flush()
                    os.fsync(f.fileno())
                except OSError as e:
                    raise write_error(e, path) from e
            os.replace(tmp, path)
        except OSError as e:  # the block's other errors (reading an input) stay as they are
            if e.errno in _WRITE_ERRNOS or e.filename == tmp:
                raise write_error(e, path) from e
            raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def loads_json(text: str | bytes, **kwargs: Any) -> Any:
    """json.loads (`kwargs` passed on), where JSON nested too deeply for Python's parser is a JSONDecodeError like
    any other bad JSON (not a RecursionError from inside the parser), so each reader's "not JSON" message covers it."""
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text if isinstance(text, str) else "", 0) from None


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync, then rename over `path`."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ directories

def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _temp_name_re(final: Path) -> re.Pattern:
    # .NAME.tmp-PID-XXXXXXXX: the temp directory of a run (PID) writing NAME
    return re.compile(r"\.%s\.tmp-(\d+)-[0-9a-f]{8}" % re.escape(final.name))


def _old_name_re(final: Path) -> re.Pattern:
    # .NAME.old-PID: the previous NAME, moved aside by a run (PID) where an exchange is not supported
    return re.compile(r"\.%s\.old-(\d+)" % re.escape(final.name))


def _remove_tree(path: Path, what: str) -> None:
    """rmtree that reports what it could not remove (a warning: the caller's result stands)."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove %s %s: %s", what, path, e.strerror or e)


def clean_stale_temp_dirs(final: str | Path) -> list[Path]:
    """Remove the temp directories that killed runs (kill -9, power loss) left beside `final`.

    Only entries that are clearly ours: a directory (not a link) named `.NAME.tmp-PID-XXXXXXXX` whose PID is
    not a live process. A `.NAME.old-PID` of a dead run (the previous output moved aside where an atomic
    exchange is unsupported) is moved back to NAME when NAME is missing, else removed.
    Returns the paths removed or restored.
    """
    final = Path(os.path.abspath(final))
    parent = final.parent
    if not parent.is_dir():
        return []
    tmp_re, old_re = _temp_name_re(final), _old_name_re(final)
    done = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        for regex in (tmp_re, old_re):
            m = regex.fullmatch(entry.name)
            if not m or entry.is_symlink() or not entry.is_dir():
                continue
            pid = int(m.group(1))
            if pid == os.getpid() or pid_alive(pid):
                continue
            if regex is old_re and not os.path.lexists(final):
                try:
                    os.rename(entry, final)
                    log.warning("restored %s from %s (left by a run killed while replacing it)", final, entry)
                except OSError as e:
                    log.warning("could not restore %s from %s: %s", final, entry, e.strerror or e)
            else:
                _remove_tree(entry, "stale temp directory")
                log.info("removed %s (left by a killed run, pid %d)", entry, pid)
            done.append(entry)
    return done


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # kernel or file system without the flag
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def check_replaceable(final: Path, replace_existing: bool) -> None:
    """What `atomic_directory` may replace: nothing, an empty directory, or (replace_existing) a directory."""
    if final.is_symlink():
        raise UserError("is a symbolic link; give the directory it points to", path=final)
    if final.exists() and not final.is_dir():
        raise UserError("exists and is not a directory; refusing to replace it", path=final)
    if not replace_existing and final.is_dir() and any(final.iterdir()):
        raise UserError("directory exists and is not empty; refusing to replace it", path=final)


@contextlib.contextmanager
def atomic_directory(final: str | Path, replace_existing: bool = False) -> Iterator[Path]:
    """Yield a new temp directory beside `final` (`.NAME.tmp-PID-XXXXXXXX`); when the block succeeds, the
    complete directory takes the place of `final`.

    What may be at `final`: nothing, an empty directory, or - only with `replace_existing` (the caller has
    decided, e.g. from `--overwrite`) - a directory with files. A file, a link or (without the flag) a
    non-empty directory is a UserError, checked before the block runs and again before the rename.

    The guarantee: `final` is the old output, untouched, until the new one is complete; then one rename
    puts the new one in place. A new `final` is one plain rename. An existing one is swapped with the temp
    directory in one atomic exchange (Linux renameat2 RENAME_EXCHANGE) and the old copy, now at the temp
    name, is removed. Where the exchange is unsupported it takes two renames (old aside to `.NAME.old-PID`,
    new into place): for that instant `final` is missing and the old output sits complete beside it;
    `clean_stale_temp_dirs` (run on entry here) moves it back if the process died in between.

    On any exception (and Ctrl-C / SIGTERM raised as exceptions) the temp directory is removed and `final`
    is left as it was; temp directories of killed runs are removed by the next run for the same `final`.
    The directory gets the umask's permissions (mkdtemp alone makes it private: 0700).
    """
    final = Path(os.path.abspath(final))
    clean_stale_temp_dirs(final)
    check_replaceable(final, replace_existing)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(mode=0o777)  # mode & ~umask
    except OSError as e:
        raise UserError(f"cannot create the output: {e.strerror or e}", path=final) from e
    try:
        yield tmp
    except BaseException as exc:
        _remove_tree(tmp, "temp directory")
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:  # a full disk: a message, not a traceback
            raise write_error(exc, final) from exc
        raise
    try:
        _put_in_place(tmp, final, replace_existing)
    except BaseException as exc:
        if tmp.exists():
            _remove_tree(tmp, "temp directory")
        if isinstance(exc, OSError):
            raise UserError(f"cannot put the output in place: {exc.strerror or exc}", path=final) from exc
        raise


def _put_in_place(tmp: Path, final: Path, replace_existing: bool) -> None:
    check_replaceable(final, replace_existing)
    if not final.exists() or not any(final.iterdir()):
        os.rename(tmp, final)  # rename(2) replaces an empty directory
        return
    if _exchange(tmp, final):
        _remove_tree(tmp, "the previous output (now at)")
        return
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    _remove_tree(old, "the previous output (now at)")


def refuse_inputs(path: str | Path, field: str, inputs: Sequence[str | Path]) -> None:
    """UserError when `path` is one of `inputs` (files or directories) or inside one: never write into an
    input, even where the user passed --overwrite."""
    resolved = Path(path).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if resolved == src or src in resolved.parents or _same_file(resolved, src):
            raise UserError(f"would write over or inside the input {src}", path=path, field=field)


def repeated_file(paths: Sequence[str | Path]) -> tuple[str | Path, str | Path] | None:
    """(the later name, the earlier name) of the first file `paths` name twice (the same path, or through a
    link or ".."), else None: a file read twice counts everything in it twice."""
    seen: dict[str, str | Path] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            return path, seen[real]
        seen[real] = path
    return None


def _same_file(a: Path, b: Path) -> bool:
    """Two names of one existing file (a hard link): an appended output would grow the input itself."""
    try:
        return a.is_file() and b.is_file() and os.path.samefile(a, b)
    except OSError:
        return False


MAX_NAME_BYTES = 255 - 32  # a file name's limit, less what the temp name adds


def check_output_name(path: str | Path, field: str) -> None:
    """Refuse an output path that is no file name one means: empty, "-" (stdout is not an output file here:
    it became a file named "-" in the current directory), or holding a control character (a newline made a
    file whose name the printed summary splits over two lines; a NUL makes the os calls raise)."""
    text = str(path)
    if not text or text == "-":
        raise UserError(f"give a file or directory path to write, got {text!r}", field=field)
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise UserError(f"control character {bad!r} in the path {text!r}; give a plain path", field=field)
    # the temp name beside it (".NAME.XXXXXXXX.tmp", ".NAME.tmp-PID-XXXXXXXX") must fit the file system's limit
    long = next((part for part in Path(text).parts if len(os.fsencode(part)) > MAX_NAME_BYTES), None)
    if long is not None:
        raise UserError(f"the name {long[:40]!r}... has {len(os.fsencode(long))} bytes; at most {MAX_NAME_BYTES} "
                        "fit (file names are limited to 255 bytes, and a temp name beside it is longer)",
                        field=field)


def check_jsonl_output(path: str | Path, field: str | None = None) -> None:
    """An output file of JSON Lines (appended to, or a transcript rewritten): not a directory, device or
    pipe and, where it already has content, JSON Lines (its first line a JSON object). Appending records to
    a report, a config or a binary file spoiled both, silently."""
    path = Path(path)
    if path.is_dir():
        raise UserError("is a directory, not a JSON Lines file", path=path, field=field)
    refuse_special_file(path, field)
    try:
        with open(path, "rb") as f:
            head = f.readline(1 << 20)
    except FileNotFoundError:
        return
    except OSError as e:
        raise UserError(f"cannot read it: {e.strerror or e}", path=path, field=field) from e
    if not head.strip():
        return  # empty (or a blank first line: a hand-edited file)
    try:
        record = loads_json(head.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict):
        raise UserError("exists and is not JSON Lines (its first line is no JSON object); refusing to write "
                        "records into it: give a new file or a JSON Lines file of this kind", path=path,
                        line=1, field=field)


def check_output_file(path: str | Path, field: str, inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse, before any work, an output file that could not be written: a directory, a parent that is a
    file or not writable, or one of the run's `inputs` (never write into an input). Creates nothing."""
    check_output_name(path, field)
    path = Path(path)
    if path.is_dir():
        raise UserError("is a directory; give a file path to write", path=path, field=field)
    refuse_special_file(path, field)
    refuse_inputs(path, field, inputs)
    parent = path.resolve().parent
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
            fd, tmp = _temp_beside(path)
            temps.append((tmp, path))
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise write_error(e, path) from e
        while temps:
            tmp, path = temps[0]
            try:
                os.replace(tmp, path)
            except OSError as e:
                raise write_error(e, path) from e
            temps.pop(0)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
