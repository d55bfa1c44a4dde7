"""The fused 8-bit kernel library: never loaded from a folder or file another user could have
planted, keyed by the CPU it was built for, and never handed a tensor it could run past."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from memlab import _cpu_kernels, _private

needs_cc = pytest.mark.skipif(_cpu_kernels._compiler() is None, reason="no C compiler")

# a library with the kernels' symbols that does nothing: loaded, it silently turns every
# 8-bit step into a no-op (what the audit planted)
PLANTED = "int memlab_sgd8bit(void) { return 0; }\nint memlab_adam8bit(void) { return 0; }\n"

STEP = textwrap.dedent("""
    import warnings, torch
    warnings.simplefilter("ignore")
    from memlab.optim import Adam8bit
    from memlab import _cpu_kernels
    p = torch.nn.Parameter(torch.zeros(8192)); p.grad = torch.ones(8192)
    Adam8bit([p], lr=0.1).step()
    print("LOADED", _cpu_kernels._build())
    print("MOVED", bool((p != 0).all()))
""")


def _plant(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "planted.c"
    src.write_text(PLANTED)
    subprocess.run([_cpu_kernels._compiler(), "-shared", "-fPIC", str(src), "-o",
                    str(folder / name)], check=True)
    src.unlink()


def _run_step(env_extra) -> str:
    env = {**os.environ, **env_extra, "MEMLAB_CPU_KERNEL": "1"}
    res = subprocess.run([sys.executable, "-c", STEP], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def _name() -> str:
    return _cpu_kernels._lib_name(_cpu_kernels._compiler())


@needs_cc
def test_planted_library_in_a_foreign_cache_is_not_loaded(tmp_path):
    cache = tmp_path / "cache"
    _plant(cache / "kernels", _name())
    os.chown(cache / "kernels", 12345, 12345) if os.getuid() == 0 else \
        os.chmod(cache / "kernels", 0o777)              # not ours / writable by others
    out = _run_step({"MEMLAB_CACHE": str(cache)})
    assert "MOVED True" in out                          # the real kernel ran
    assert str(cache) not in out.split("LOADED")[1].splitlines()[0]


@needs_cc
def test_predictable_tmp_fallback_is_never_used(tmp_path):
    """The old fallback /tmp/memlab-kernels-<uid> loaded whatever it found there."""
    tmp = tmp_path / "tmp"
    _plant(tmp / f"memlab-kernels-{os.getuid()}", _name())
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)                             # the home cache is unusable
    out = _run_step({"MEMLAB_CACHE": str(shared), "TMPDIR": str(tmp)})
    assert "MOVED True" in out
    loaded = out.split("LOADED")[1].splitlines()[0].strip()
    assert f"memlab-kernels-{os.getuid()}/" not in loaded


@needs_cc
def test_tampered_library_in_our_cache_is_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    out = _run_step({"MEMLAB_CACHE": str(cache)})       # builds and records its checksum
    lib = cache / "kernels" / _name()
    assert lib.is_file() and (lib.parent / (lib.name + ".sha256")).is_file()
    assert "MOVED True" in out
    _plant(cache / "kernels", _name())                  # same name, other bytes
    assert "MOVED True" in _run_step({"MEMLAB_CACHE": str(cache)})


def test_cache_key_names_the_cpu(monkeypatch):
    a = _cpu_kernels._lib_name("cc")
    monkeypatch.setattr(_cpu_kernels, "_cpu_id", lambda: "vendor_id: other\nflags: sse2")
    assert _cpu_kernels._lib_name("cc") != a


def test_private_dir_creates_0700_and_refuses_shared(tmp_path):
    d = _private.private_dir(tmp_path / "a" / "b")
    assert (d.stat().st_mode & 0o777) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(_private.UnsafeDirectory, match="writable by group or others"):
        _private.private_dir(shared)
    with pytest.raises(_private.UnsafeDirectory, match="ancestor"):
        _private.private_dir(shared / "inside")          # others could rename it
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(_private.UnsafeDirectory, match="symbolic link"):
        _private.private_dir(link)


CRAFTED = textwrap.dedent("""
    import torch
    from memlab import _cpu_kernels
    from memlab.quant import QTensor
    n = 1 << 16
    p = torch.zeros(n); g = torch.ones(n)
    m = QTensor.zeros((n,), True)
    bad = QTensor(torch.zeros(1, dtype=torch.uint8).expand(n), m.absmax.clone(), (n,), False)
    try:
        _cpu_kernels.adam8bit(p, g, m, bad, step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                              weight_decay=0.0, decoupled=False, maximize=False)
    except ValueError as e:
        print("REFUSED", e)
""")


@needs_cc
def test_stride0_state_is_refused_before_a_pointer_is_taken():
    res = subprocess.run([sys.executable, "-c", CRAFTED], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "MEMLAB_CPU_KERNEL": "1"})
    assert res.returncode == 0, res.stderr[-1000:]      # before: double free, exit 134
    assert "REFUSED exp_avg_sq_codes must be a contiguous uint8 tensor" in res.stdout


@needs_cc
def test_a_code_book_with_a_short_table_is_refused_even_after_a_valid_step():
    """The book's tables are checked once and remembered by identity: a table replaced after
    a valid step (a shorter lookup table) is checked again and refused before a pointer."""
    import copy
    from memlab.quant import QTensor
    n = 4096
    buf = QTensor.zeros((n,), True)
    args = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                maximize=False, first=True)
    _cpu_kernels.sgd8bit(torch.zeros(n), torch.ones(n), buf, **args)       # valid: remembered
    buf._book = copy.copy(buf._book)                                       # same tables: fine
    _cpu_kernels.sgd8bit(torch.zeros(n), torch.ones(n), buf, **args)
    buf._book.lut32 = torch.zeros(10, dtype=torch.int32)
    with pytest.raises(ValueError, match="momentum_buffer: the code book has no 16-bit"):
        _cpu_kernels.sgd8bit(torch.zeros(n), torch.ones(n), buf, **args)


@needs_cc
def test_short_absmax_storage_is_refused():
    n = 4096
    q = _cpu_kernels
    from memlab.quant import QTensor
    buf = QTensor.zeros((n,), True)
    buf.absmax = torch.zeros(n // 256 * 2)[::2]          # right numel, strided
    with pytest.raises(ValueError, match="momentum_buffer_absmax"):
        q.sgd8bit(torch.zeros(n), torch.ones(n), buf, lr=0.1, momentum=0.9, dampening=0.0,
                  weight_decay=0.0, nesterov=False, maximize=False, first=True)


def test_pretrained_checkpoint_cache_is_private(tmp_path, monkeypatch):
    """The low-rank study's pretrained checkpoints were cached in a shared <tmp>/memlab-cache:
    another user could plant the state dict every later run adapts from."""
    from memlab.bench import lowrank as study
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setenv("MEMLAB_CACHE_DIR", str(shared))
    with pytest.warns(UserWarning, match="not using the checkpoint cache"):
        folder = study.cache_dir()
    assert folder != shared and (folder.stat().st_mode & 0o077) == 0
    monkeypatch.setenv("MEMLAB_CACHE_DIR", str(tmp_path / "mine"))
    assert study.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MEMLAB_CACHE_DIR")
    monkeypatch.setenv("MEMLAB_CACHE", str(tmp_path / "root"))
    assert study.cache_dir() == tmp_path / "root" / "pretrained"
