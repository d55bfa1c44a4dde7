"""Private cache directories: what memlab writes and later loads again lives only where no other
user can write.

A cache in a shared place (``/tmp/memlab-...``) lets any local user plant a file that the next
run loads: a compiled kernel library runs as the loading user, a checkpoint silently changes the
results. So every cache folder memlab reuses must be

* a real directory (not a symlink), owned by this user, with no write bit for group or others;
* below ancestors that nobody else can rename or replace: each owned by this user or root, and
  not writable by others unless sticky (``/tmp`` is; a sticky folder keeps others from renaming
  what is ours in it).

:func:`private_dir` creates a folder that way (mode 0700) or verifies an existing one, and
raises :class:`UnsafeDirectory` (naming the folder and the reason) otherwise: callers then fall
back to a fresh :func:`tempfile.mkdtemp` folder used by this process only.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["UnsafeDirectory", "private_dir", "check_private_file", "user_cache_root"]


class UnsafeDirectory(OSError):
    """A cache folder that another user could write to (or that is not ours)."""


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


def _why_unsafe(path: Path, leaf: bool) -> str:
    """'' if ``path`` is safe (as a cache folder when ``leaf``, else as one of its ancestors)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) and leaf:
        return "is a symbolic link"
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(path)                 # an ancestor may be a link (e.g. /home): judge target
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if leaf:
        if st.st_uid != _uid():
            return f"is owned by uid {st.st_uid}, not by this user (uid {_uid()})"
        if st.st_mode & 0o022:
            return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
        return ""
    if st.st_uid not in (0, _uid()):
        return f"has an ancestor {path} owned by uid {st.st_uid}"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return f"has an ancestor {path} writable by others without the sticky bit"
    return ""


def private_dir(path) -> Path:
    """``path`` as a private folder: created with mode 0700 (and its missing parents 0700) if
    absent, else verified. Raises :class:`UnsafeDirectory` when it is not safe to reuse."""
    path = Path(path).expanduser().absolute()
    missing = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for q in reversed(missing):
        try:
            os.mkdir(q, 0o700)
        except FileExistsError:
            pass
    for i, q in enumerate([path, *path.parents]):
        why = _why_unsafe(q, leaf=i == 0)
        if why:
            raise UnsafeDirectory(f"{path} {why}" if i == 0 else f"{path} {why}")
    return path


def check_private_file(path) -> str:
    """'' if ``path`` is a regular file (not a link) owned by this user and not writable by
    group or others; else the reason."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid != _uid():
        return f"{path} is owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"{path} is writable by group or others"
    return ""


def user_cache_root() -> Path:
    """``$MEMLAB_CACHE`` or ``~/.cache/memlab`` (not created here)."""
    return Path(os.environ.get("MEMLAB_CACHE") or
                os.path.join(os.path.expanduser("~"), ".cache", "memlab"))
