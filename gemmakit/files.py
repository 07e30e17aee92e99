"""Writing files and folders so that a crash never leaves a partial one behind.

A leaf module (standard library only): everything that writes a file a user or a later run
reads goes through here. Each file written gets the mode a plain `open(path, "w")` would give
under the process's umask (0644 under umask 022), whatever its writer chose: safetensors'
`save_file` creates its file 0600, which left exports, adapters and checkpoints unreadable to
the group and others while their siblings were not.

A temporary is named `.NAME.tmp-PID` beside its target; a write killed mid-way (SIGKILL, the
OOM killer, a power cut) leaves it behind, so the next write into the same folder removes
those whose process is gone (`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not atomic across threads)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Gives the file at `path` the mode a new file gets under the umask (execute bits kept)."""
    mode = os.stat(path).st_mode
    base = 0o777 if mode & 0o111 else 0o666
    os.chmod(path, base & ~current_umask())


# `.NAME.tmp-PID`, as `atomic_write` and `atomic_folder` name their temporaries.
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user's counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only the existence and permission checks
    except (ProcessLookupError, OverflowError):  # no such process; no id that large
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Removes the `.NAME.tmp-PID` files and folders in `folder` whose process is gone;
    returns them. A live process's temporary (its write is under way) is never touched. A
    PID reused by an unrelated process keeps its temporary until that process ends: a
    leftover is better than a write destroyed under a running export."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMPORARY.match(entry.name)
        if m is None or process_alive(int(m.group(1))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass  # another run removed it first, or it is not ours to remove
    return removed


def content_key(path: Path, samples: int = 64, block: int = 64 * 1024) -> str:
    """A key of a file's content: sha256 of its size and `samples` blocks spread evenly over it
    (the whole file when it is smaller than that). Reading 4 MiB instead of all of a 1 GB
    model keeps a cache lookup in milliseconds; two model files that differ do so in their
    tensor data throughout, so spread samples tell them apart. Independent of the file's
    name, place and modification time, so a copy or a `touch` finds the same key."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        if size <= samples * block:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            for i in range(samples):
                f.seek((size - block) * i // (samples - 1))
                h.update(f.read(block))
    return h.hexdigest()


def atomic_write(path: Path, write):
    """Calls write(tmp_path) and renames into place, so a crash never leaves a partial file.

    The file gets the umask's mode (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(folder: Path, replace: bool = False):
    """Yields an empty temporary folder beside `folder`; when the block ends without an
    error, renames it to `folder` in one step (first removing an existing `folder` when
    `replace`, else leaving an existing one untouched and the new one discarded). On an error
    the temporary folder is removed and `folder` is as it was. Every file in it gets the
    umask's mode (see the module docstring)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder.parent)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                follow_umask(f)
        if folder.exists() and replace:
            shutil.rmtree(folder)
        if not folder.exists():
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
