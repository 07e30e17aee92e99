"""Writing files and folders so that a crash never leaves a partial one behind.

A leaf module (standard library only): everything that writes a file a user or a later run
reads goes through here. Each file written gets the mode a plain `open(path, "w")` would give
under the process's umask (0644 under umask 022), whatever its writer chose: safetensors'
`save_file` creates its file 0600, which left exports, adapters and checkpoints unreadable to
the group and others while their siblings were not.
"""

from __future__ import annotations

import contextlib
import os
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


def atomic_write(path: Path, write):
    """Calls write(tmp_path) and renames into place, so a crash never leaves a partial file.

    The file gets the umask's mode (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
