"""Atomic file output: a crash or Ctrl-C never leaves a file or folder that looks complete.

Temporary names are `.<target name>.<pid>-<8 random characters>.<tmp|partial|old>[suffix]` beside
the target, so the leftovers of a killed save are recognisable: the next save to the same target
removes them, and a run removes every one under its folder when it starts. A temporary whose
process is still alive is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".loracombench.lock"
# mkstemp/mkdtemp draw 8 characters from [a-z0-9_] between our prefix and suffix; names
# written before the pid was recorded have none.
_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.((?P<pid>\d+)-)?[a-z0-9_]{8}\.(tmp(\.[^.]+)?|partial|old)$")


class FileFormatError(ValueError):
    """A file that exists but cannot be parsed (invalid JSON, a corrupt weights file)."""


class BusyError(RuntimeError):
    """The folder is locked by another running command."""


_UMASK = os.umask(0)
os.umask(_UMASK)


def _publish(tmp: str | Path, path: Path) -> None:
    """Give the temporary file ordinary permissions (mkstemp makes it private), then move it in."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


def is_leftover(name: str) -> bool:
    """Whether a file or folder name is a temporary of an atomic save (or the run lock)."""
    return name == LOCK_FILE or _LEFTOVER.match(name) is not None


def is_abandoned_leftover(name: str) -> bool:
    """A temporary of an atomic save whose writing process has ended (or is unknown): one that a
    live process is still writing must not be removed."""
    match = _LEFTOVER.match(name)
    return match is not None and _abandoned(match)


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-"


def _abandoned(match: re.Match) -> bool:
    """A leftover whose writing process has ended (or is unknown)."""
    if match["pid"] is None:
        return True
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(path: str | Path) -> None:
    """Remove what killed saves to `path` left beside it (their staging folders can be large)."""
    path = Path(path)
    if path.parent.is_dir():
        for entry in path.parent.glob(f".{glob.escape(path.name)}.*"):
            match = _LEFTOVER.match(entry.name)
            if match and match["target"] == path.name and _abandoned(match):
                _remove(entry)


def remove_leftovers_under(folder: str | Path) -> None:
    """Remove every leftover temporary of a killed save anywhere under `folder`."""
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            match = _LEFTOVER.match(name)
            if match and _abandoned(match):
                _remove(Path(root) / name)
        dirs[:] = [d for d in dirs if not _LEFTOVER.match(d)]


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows) -> Path:
    return write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def read_json(path: str | Path):
    """Parsed JSON; a file that is not valid JSON raises FileFormatError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise FileFormatError(f"{path}: not a UTF-8 text file (expected JSON)") from None
    except json.JSONDecodeError as err:
        raise FileFormatError(f"{path}: invalid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None


def read_jsonl(path: str | Path) -> list:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; move it into place only on success.

    For writers that insist on a path (matplotlib, safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    # The target's suffix stays last: some writers pick the format from it.
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# Output folders that a command found absent or empty and so may only create, never replace
# (outputs.check_out adds them): another command, or the user, can fill one while this one runs.
_CREATE_ONLY: set[Path] = set()


class OutputAppearedError(FileExistsError):
    """An output folder that was absent or empty when the command started was filled by
    something else before the command finished; it is kept, and the command's output is set aside."""


def probe_writable(folder: Path, target: Path) -> None:
    """Create and remove a temporary file in `folder`, named as a leftover of `target` would be
    (so an interrupted probe is cleaned up like one): OSError when this process cannot write
    there, whatever the reason (permissions, a read-only mount)."""
    handle, probe = tempfile.mkstemp(prefix=_temporary_prefix(target), suffix=".partial", dir=folder)
    os.close(handle)
    os.unlink(probe)


def create_only(path: str | Path, only: bool = True) -> None:
    """Whether atomic_dir may later publish `path` only where nothing but leftovers is (only), or
    may replace what is there (the user asked to, with --overwrite)."""
    (_CREATE_ONLY.add if only else _CREATE_ONLY.discard)(Path(path).resolve())


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh staging folder beside `path`; it replaces `path` only if the block succeeds.

    An existing `path` is kept until the new one is complete, so a failed rerun loses nothing.
    A path claimed with create_only is never replaced if it holds more than leftovers by then:
    the new folder is set aside beside it and OutputAppearedError says where. A symlink is
    written through: its target is replaced and the link stays."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    staging = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".partial", dir=path.parent))
    os.chmod(staging, 0o777 & ~_UMASK)
    try:
        yield staging
        _ordinary_permissions(staging)
        if path.resolve() in _CREATE_ONLY:
            _CREATE_ONLY.discard(path.resolve())  # one claim, one publish: later saves replace as usual
            _publish_new(staging, path)
        elif path.exists():
            _replace_dir(staging, path)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_dir(staging: Path, path: Path) -> None:
    old = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".old", dir=path.parent))
    os.replace(path, old / "x")
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)


def _publish_new(staging: Path, path: Path) -> None:
    """Move `staging` to `path` unless `path` now holds something: rename(2) onto a non-empty
    folder fails, so nothing written there in the meantime can be replaced."""
    try:
        os.rename(staging, path)
        return
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
    if path.is_dir() and not path.is_symlink() and all(
            e.name == LOCK_FILE or is_abandoned_leftover(e.name) for e in path.iterdir()):
        _replace_dir(staging, path)  # only a stale lock or the temporaries of ended saves
        return
    aside = Path(tempfile.mkdtemp(prefix=f"{path.name}.not-published-", dir=path.parent))
    os.replace(staging, aside / path.name)
    raise OutputAppearedError(f"{path} was filled by something else while this command ran; it was left as it is, "
                              f"and this command's complete output is in {aside / path.name}")


def _ordinary_permissions(folder: Path) -> None:
    """The umask's permissions for everything a save put in `folder`: some writers (safetensors,
    hence PEFT's save_pretrained) create owner-only files, which other users of a shared run
    folder or cache could then not read."""
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(Path(root) / name, 0o777 & ~_UMASK)
        for name in files:
            if not (Path(root) / name).is_symlink():
                os.chmod(Path(root) / name, 0o666 & ~_UMASK)


@contextlib.contextmanager
def exclusive_lock(folder: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (created if needed) for the block; a second holder is
    refused at once with BusyError. The kernel releases the lock when the process ends, however."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise BusyError(f"{folder} is in use by another loracombench {what} (pid {holder}); "
                            f"wait for it to finish, or choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield folder
    finally:
        handle.close()
