"""Build, verify and load memlab's small C kernels (the fused 8-bit optimizer step, the
sample-wise transducer lattice) the one safe way.

A kernel is compiled with the system C compiler (``$CC``, else cc / gcc / clang) into the private
cache ``$MEMLAB_CACHE/kernels`` (default ``~/.cache/memlab/kernels``; :mod:`memlab._private`:
ours, 0700, no ancestor others can write to without the sticky bit), named by a hash of the
source, the flags, the compiler, the platform and the CPU (``-march=native``), written
atomically with its sha256 beside it. A cached library is loaded only if it is a regular file of
ours, not group/world-writable, whose sha256 matches the recorded one; otherwise it is rebuilt.
When the cache cannot be made private, the library is compiled into a fresh ``tempfile`` folder
used by this process alone (never a predictable shared path).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

from memlab._private import check_private_file, private_dir, user_cache_root

_SCRATCH: List[tempfile.TemporaryDirectory] = []   # per-process folders when the cache is unsafe


def compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def cpu_id() -> str:
    """What ``-march=native`` compiles for: the CPU model and its feature flags (Linux), else
    the platform's processor string, so a cache shared by two machines never hands one the
    other's instructions."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(1 << 16)
        keep = [ln for ln in text.splitlines()
                if ln.split(":")[0].strip() in ("vendor_id", "model name", "flags", "Features",
                                                "CPU part", "isa")]
        return "\n".join(dict.fromkeys(keep))
    except OSError:
        return platform.machine() + platform.processor()


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def lib_name(prefix: str, source: str, flags: Sequence[str], cc: str, cpu: str) -> str:
    """File name of a library: ``prefix-<hash of source, flags, compiler, platform, cpu>.so``."""
    key = hashlib.sha256("\0".join([source, " ".join(flags), cc, sys.platform,
                                    cpu]).encode()).hexdigest()[:16]
    return f"{prefix}-{key}.so"


def compile_into(cc: str, folder: Path, name: str, source: str,
                 flag_sets: Sequence[Sequence[str]]) -> Path:
    """Compile ``source`` into ``folder/name`` (the first flag set that works; atomically) and
    record its sha256 beside it."""
    out = folder / name
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src, lib = Path(tmp) / "kernel.c", Path(tmp) / "kernel.so"
        src.write_text(source)
        res = None
        for flags in flag_sets:
            res = subprocess.run([cc, *flags, str(src), "-o", str(lib), "-lm"],
                                 capture_output=True, text=True, timeout=120)
            if res.returncode == 0:
                break
        if res is None or res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[:500] if res else 'no flags'}")
        os.chmod(lib, 0o700)
        sig = Path(tmp) / "sig"
        sig.write_text(digest(lib))
        os.replace(lib, out)                       # atomic: another process may race us
        os.replace(sig, folder / (name + ".sha256"))
    return out


def build(name: str, source: str, flag_sets: Sequence[Sequence[str]], cc: str,
          warn: Callable[[str], None]) -> Path:
    """Path of a library this process may load (see the module docstring)."""
    try:
        folder = private_dir(user_cache_root() / "kernels")
    except OSError as e:                           # read-only home, planted or shared folder
        warn(f"memlab: not using the kernel cache ({e}); compiling into a private temporary "
             f"folder for this process")
        _SCRATCH.append(tempfile.TemporaryDirectory(prefix="memlab-kernels-"))  # 0700
        return compile_into(cc, Path(_SCRATCH[-1].name), name, source, flag_sets)
    lib, sig = folder / name, folder / (name + ".sha256")
    if lib.exists() or os.path.lexists(lib):
        ok = not check_private_file(lib) and sig.is_file() and not check_private_file(sig)
        if ok and sig.read_text().strip() == digest(lib):
            return lib
        warn(f"memlab: {lib} is not the library memlab built (owner, mode or checksum differ); "
             f"rebuilding it")
    return compile_into(cc, folder, name, source, flag_sets)


class LazyLibrary:
    """A kernel library built and loaded on first use, once per process; ``get()`` returns the
    ``ctypes.CDLL`` or None (``MEMLAB_CPU_KERNEL=0``, no compiler, the build failed: then a
    warning names ``fallback``, once, and the callers take their torch path)."""

    def __init__(self, build: Callable[[], Path], declare: Callable[[Any], None], what: str,
                 fallback: str):
        self._build, self._declare, self._what, self._fallback = build, declare, what, fallback
        self._lib: Any = None                      # CDLL, or False once loading failed
        self._lock = threading.Lock()

    def get(self):
        if os.environ.get("MEMLAB_CPU_KERNEL", "1") == "0":
            return None
        if self._lib is None:
            with self._lock:
                if self._lib is None:
                    import ctypes
                    try:
                        lib = ctypes.CDLL(str(self._build()))
                        self._declare(lib)
                        self._lib = lib
                    except Exception as e:  # noqa: BLE001  no compiler, sandbox: torch works
                        warnings.warn(f"memlab: {self._what} unavailable ({e}); using "
                                      f"{self._fallback}")
                        self._lib = False
        return self._lib or None
