"""``memlab lab`` and ``memlab lab --app``: JupyterLab on the tutorials, or the dashboard alone
under Voila, on 127.0.0.1 with a fresh token that never appears on a command line.

Split from :mod:`memlab.cli` (which re-exports these names) to keep each module small.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple


# ----------------------------------------------------------------------------- lab
# JupyterLab reaches for the network in three places; memlab lab turns all three off.
# The announcements plugin asks "Would you like to get notified about official Jupyter news?",
# then fetches the news feed and checks for updates: it is disabled in the page config (a
# labconfig/page_config.json in a private folder put first on JUPYTER_CONFIG_PATH, merged with
# the user's own). The server-side handlers it would call get no feed and no update checker, and
# the extension manager does not list PyPI.
LAB_DISABLED_PLUGINS = ("@jupyterlab/apputils-extension:announcements",)
LAB_OFFLINE_ARGS = ("--LabApp.news_url=None",
                    "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                    "--LabApp.extension_manager=readonly")


def notebooks_source() -> Path:
    """Where the bundled tutorials live (source checkout or installed package)."""
    from importlib import resources
    return Path(str(resources.files("memlab.notebooks")))


def lab_launch(dest: Path, port: int, token: str, private_dir: Path,
               no_browser: bool = False) -> Tuple[List[str], Dict[str, str]]:
    """The JupyterLab command line and environment; writes the page config into private_dir.

    The token travels in the environment (``JUPYTER_TOKEN``, read by jupyter_server's
    IdentityProvider): /proc/<pid>/cmdline is world-readable, /proc/<pid>/environ is not.
    """
    labconfig = Path(private_dir) / "labconfig"
    labconfig.mkdir(mode=0o700, exist_ok=True)
    page = labconfig / "page_config.json"
    fd = os.open(page, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"disabledExtensions": {p: True for p in LAB_DISABLED_PLUGINS}}, f)
    env = dict(os.environ)
    env["JUPYTER_TOKEN"] = token
    env.pop("JUPYTER_TOKEN_FILE", None)
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(
        [str(private_dir)] + [p for p in os.environ.get("JUPYTER_CONFIG_PATH", "").split(
            os.pathsep) if p])
    # `python -m jupyterlab` is the server itself (not a launcher), so Ctrl+C stops it
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={dest}",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", *LAB_OFFLINE_ARGS]
    if no_browser:
        cmd.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers often run as root; Jupyter refuses otherwise
    return cmd, env


APP_NOTEBOOK = "memlab_app.ipynb"
APP_SOURCE = ("from memlab.widgets import MemoryLab\n"
              "lab = MemoryLab(task=\"speaker\")\n"
              "lab.show()")


def app_launch(port: int, token: str, private_dir: Path) -> Tuple[List[str], Dict[str, str],
                                                                  Path]:
    """``memlab lab --app``: the Voila command serving the dashboard alone, its environment and
    working folder (``private_dir``, 0700). The token is in ``private_dir/voila.json`` (0600;
    Voila reads voila.json from its working folder first), not on the command line."""
    private_dir = Path(private_dir)
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "id": "memlab-app",
                     "metadata": {}, "outputs": [], "source": APP_SOURCE}],
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                      "name": "python3"}},
          "nbformat": 4, "nbformat_minor": 5}
    for name, body in ((APP_NOTEBOOK, nb), ("voila.json", {"Voila": {"token": token}})):
        fd = os.open(private_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(body, f)
    env = dict(os.environ)
    env.pop("JUPYTER_TOKEN", None)
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(
        [str(private_dir)] + [p for p in os.environ.get("JUPYTER_CONFIG_PATH", "").split(
            os.pathsep) if p])
    cmd = [sys.executable, "-m", "voila", str(private_dir / APP_NOTEBOOK), "--no-browser",
           "--Voila.ip=127.0.0.1", f"--port={port}", "--Voila.port_retries=0"]
    return cmd, env, private_dir


def _cmd_app(args) -> int:
    import tempfile
    try:
        import voila  # noqa: F401
    except ImportError:
        print('memlab lab: error: Voila is not installed: pip install "memlab[lab]"',
              file=sys.stderr)
        return 2
    if not 1 <= args.port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {args.port}")
    token = secrets.token_hex(24)
    private = Path(tempfile.mkdtemp(prefix="memlab-app-"))  # 0700, removed when it stops
    try:
        cmd, env, cwd = app_launch(args.port, token, private)
        print(f"memlab lab: the dashboard as a web app (Ctrl+C stops the server):\n"
              f"  http://127.0.0.1:{args.port}/?token={token}", flush=True)
        if args.dry_run:
            print(" ".join(cmd))
            return 0
        try:
            return subprocess.call(cmd, env=env, cwd=cwd)
        except KeyboardInterrupt:
            return 0
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _cmd_lab(args) -> int:
    import tempfile
    if getattr(args, "app", False):
        return _cmd_app(args)
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        print('memlab lab: error: JupyterLab is not installed: pip install "memlab[lab]"',
              file=sys.stderr)
        return 2
    if not 1 <= args.port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {args.port}")
    src = notebooks_source()
    dest = Path(args.dir).expanduser().resolve()
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"--dir must be a folder, got the file {str(dest)!r}")
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for nb in sorted(src.glob("*.ipynb")):
        target = dest / nb.name
        if target.exists() and not args.overwrite:
            continue
        shutil.copyfile(nb, target)
        copied.append(nb.name)
    print(f"memlab lab: tutorials in {dest}" + (f" (copied {len(copied)})" if copied else
                                                 " (kept your copies; --overwrite to refresh)"))
    token = secrets.token_hex(24)
    url = f"http://127.0.0.1:{args.port}/lab/tree/00_where_memory_goes.ipynb?token={token}"
    private = Path(tempfile.mkdtemp(prefix="memlab-lab-"))  # 0700, removed when the server stops
    try:
        cmd, env = lab_launch(dest, args.port, token, private, no_browser=args.no_browser)
        print(f"memlab lab: open this address in your browser (Ctrl+C stops the server):\n"
              f"  {url}", flush=True)
        if args.dry_run:
            print(" ".join(cmd))
            return 0
        try:
            return subprocess.call(cmd, env=env)
        except KeyboardInterrupt:
            return 0
    finally:
        shutil.rmtree(private, ignore_errors=True)


