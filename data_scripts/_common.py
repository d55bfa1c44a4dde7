"""Helpers shared by the prepare_*.py scripts (which never download anything)."""

import os
import sys

try:
    import memlab  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memlab.data.audio import audio_info  # noqa: E402
from memlab.data.manifest import text_lines, write_manifest  # noqa: E402,F401 - text_lines for the scripts


def check_root(root):
    if not os.path.isdir(root):
        raise SystemExit(f"--root must be an existing folder (your local copy of the corpus), got {root!r}")
    return os.path.abspath(root)


def walk_files(root):
    """(folder, file name) of every file below ``root``, in a stable sorted order."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            yield folder, f


def duration(path):
    frames, rate = audio_info(path)
    return round(frames / rate, 3)


def write(out_dir, name, entries):
    path = os.path.join(out_dir, name)
    n = write_manifest(path, entries)
    print(f"wrote {n} entries to {path}")
    return path


def run(main):
    """Run a script's main(); a bad corpus file (a ValueError/TypeError naming the file and line)
    becomes one line on stderr and exit status 1, not a traceback."""
    try:
        main()
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None
