"""Writing files and folders so that a crash never leaves a partial one behind.

A leaf module (standard library only): everything that writes a file a user or a later run
reads goes through here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def atomic_write(path: Path, write):
    """Calls write(tmp_path) and renames into place, so a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(folder: Path, replace: bool = False):
    """Yields an empty temporary folder beside `folder`; when the block ends without an
    error, renames it to `folder` in one step (first removing an existing `folder` when
    `replace`, else leaving an existing one untouched and the new one discarded). On an error
    the temporary folder is removed and `folder` is as it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if folder.exists() and replace:
            shutil.rmtree(folder)
        if not folder.exists():
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
