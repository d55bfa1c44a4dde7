"""The tutorials in a real JupyterLab + Chromium.

* tutorial 00: Run All, move a slider, press Run, a bar appears;
* tutorial 03: Run All; both bars of the loss-step calculator are drawn at readable heights
  (read from the bar rectangles of the plotly SVG, against the plot area's height), and the GPU
  lines' labels lie inside the plot;
* the other tutorials: Run All without an error.

Every test saves a screenshot of each plotly figure of its tutorial, as a learner sees it, under
artifacts/ (browser_<notebook>_<n>.png; gitignored, kept by CI for a reviewer).

Starts JupyterLab on 127.0.0.1 (a free port, token off *only here*, root_dir = a temporary copy of
notebooks/, MEMLAB_FAST=1) and drives Debian's Chromium with Playwright (no browser download).
Skips when /usr/bin/chromium or playwright is missing.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# pytest-xdist (-n 2 --dist loadgroup): one JupyterLab/Voila and Chromium at a time
pytestmark = [pytest.mark.browser,
              pytest.mark.xdist_group("browser")]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
NOTEBOOK = "00_where_memory_goes.ipynb"
RUN_ALL_TIMEOUT_S = int(os.environ.get("MEMLAB_BROWSER_TIMEOUT_S", "300"))

# JupyterLab settings for the test profile: every cell in the DOM. (No news setting here: the
# server is started with `memlab lab`'s own command and settings, which must keep the prompt off.)
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings":
        {"windowingMode": "none", "autoStartDefaultKernel": True},
}
TOKEN = secrets.token_hex(16)   # passed as memlab lab passes it: in the environment
NEWS_PROMPT = "Would you like to get notified"

# JS: number of bars (runs) in the dashboard's breakdown figure; -1 while it is not drawn.
BARS_JS = """() => {
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    const title = plot.querySelector('.gtitle');
    if (!title || !title.textContent.includes('Memory at the peak')) continue;
    const trace = plot.querySelector('.barlayer .trace');
    return trace ? trace.querySelectorAll('.point').length : 0;
  }
  return -1;
}"""
# JS: the calculator figure of tutorial 03 ("Loss step" title): per bar its drawn height in px,
# the plot area's height, and where the GPU-line labels are relative to the plot area.
CALCULATOR_JS = """() => {
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    const title = plot.querySelector('.gtitle');
    if (!title || !title.textContent.startsWith('Loss step')) continue;
    const area = plot.querySelector('.cartesianlayer .subplot .bglayer rect, .nsewdrag')
        .getBoundingClientRect();
    // visible height: a bar on a log axis is a path from far below, clipped to the plot area
    const bars = [...plot.querySelectorAll('.barlayer .point path')].map(p => {
      const r = p.getBoundingClientRect();
      return Math.min(r.bottom, area.bottom) - Math.max(r.top, area.top);
    });
    const labels = [...plot.querySelectorAll('.annotation')].map(a => {
      const r = a.getBoundingClientRect();
      return {text: a.textContent, top: r.top - area.top, bottom: r.bottom - area.top};
    });
    const lines = [...plot.querySelectorAll('.shapelayer path')].map(p => {
      const r = p.getBoundingClientRect();
      return (r.top + r.bottom) / 2 - area.top;
    });
    return {plot_height: area.height, bars, labels, lines};
  }
  return null;
}"""
STARTED_JS = """() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
    .some(e => /\\[(\\*|\\d+)\\]/.test(e.textContent))"""
# JS: "done" when every code cell has an execution count, "error" when a cell raised.
RUN_STATE_JS = """() => {
  if ([...document.querySelectorAll('.jp-OutputArea-output')]
        .some(e => e.textContent.includes('Traceback (most recent call last)')
                   || e.getAttribute('data-mime-type') === 'application/vnd.jupyter.stderr'
                      && /Error|Exception/.test(e.textContent))) return 'error';
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
      .map(e => e.textContent.trim());
  return prompts.length > 0 && prompts.every(t => /\\[\\d+\\]/.test(t)) ? 'done' : '';
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer {url} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def lab_url(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")
    pytest.importorskip("jupyterlab")
    base = tmp_path_factory.mktemp("jupyterlab")
    root = base / "notebooks"
    root.mkdir()
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        shutil.copy(nb, root / nb.name)
    settings = base / "settings"
    for rel, values in SETTINGS.items():
        path = settings / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port = _free_port()
    env = dict(os.environ, MEMLAB_FAST="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get(
                   "PYTHONPATH", "").split(os.pathsep) if p]),
               JUPYTER_CONFIG_DIR=str(base / "config"),
               JUPYTER_RUNTIME_DIR=str(base / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"))
    from memlab.cli import lab_launch
    private = base / "private"
    private.mkdir(mode=0o700)
    cmd, lab_env = lab_launch(root, port, TOKEN, private, no_browser=True)   # memlab lab's own
    env.update({k: v for k, v in lab_env.items() if k in ("JUPYTER_TOKEN", "JUPYTER_CONFIG_PATH")})
    assert TOKEN not in " ".join(cmd)
    log = open(base / "jupyterlab.log", "wb")
    # Own session: the kernels the server starts can be ended with it (by this group id only).
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/api/status?token={TOKEN}", proc, timeout=90)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # kernels left in the server's own group
        except (ProcessLookupError, PermissionError):
            pass
        log.close()


def _run_all(page, lab_url: str, notebook: str) -> None:
    """Open ``notebook`` in JupyterLab, Run All Cells, wait until every cell has run."""
    page.goto(f"{lab_url}/lab/tree/{notebook}?reset&token={TOKEN}")   # ?reset: no old tabs
    page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=120_000)
    page.wait_for_selector("text=Kernel status: Idle", state="attached", timeout=120_000)
    page.keyboard.press("Control+b")            # hide the file browser: more room
    for attempt in range(3):                    # Run ▸ Run All Cells
        try:
            dialog = page.locator(".jp-Dialog .jp-mod-accept")
            if dialog.count():                  # e.g. "Select Kernel": accept
                dialog.first.click()
            page.locator(".jp-Notebook .jp-Cell").first.click()   # focus the notebook
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            page.wait_for_function(STARTED_JS, timeout=30_000, polling=250)
            break
        except Exception:
            if attempt == 2:
                raise
            page.keyboard.press("Escape")
    state = page.wait_for_function(RUN_STATE_JS, timeout=RUN_ALL_TIMEOUT_S * 1000, polling=500)
    if state.json_value() == "error":
        texts = page.locator(".jp-OutputArea-output").all_inner_texts()
        pytest.fail("a cell raised:\n" + "\n".join(t for t in texts if "Error" in t))


def _screenshot_figures(page, notebook: str) -> int:
    """Save each plotly figure of the open notebook as artifacts/browser_<stem>_<n>.png."""
    stem = Path(notebook).stem
    plots = page.locator(".jp-OutputArea .js-plotly-plot")
    for i in range(plots.count()):
        plot = plots.nth(i)
        plot.scroll_into_view_if_needed()
        plot.screenshot(path=str(ARTIFACTS / f"browser_{stem}_{i:02d}.png"))
    return plots.count()


def _browser(pw):
    return pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def _on_failure(page, console, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"browser_{name}_failure.png"), full_page=True)
    print("\n".join(console[-60:]))
    print("\n---\n".join(page.locator(".jp-OutputArea-output").all_inner_texts()))


def test_tutorial00_dashboard_in_chromium(lab_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    console = []
    with sync_playwright() as pw:
        browser = _browser(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        try:
            _run_all(page, lab_url, NOTEBOOK)
            # memlab lab's settings keep JupyterLab's news prompt away
            assert NEWS_PROMPT not in page.locator("body").inner_text()
            assert page.locator(".jp-Notification-Toast").count() == 0 or NEWS_PROMPT not in \
                " ".join(page.locator(".jp-Notification-Toast").all_inner_texts())
            # the dashboard and its breakdown figure, with the notebook's two runs
            page.wait_for_function(f"({BARS_JS})() >= 2", timeout=60_000, polling=250)
            before = page.evaluate(BARS_JS)
            dash = page.locator(".memlab-lab").last
            dash.scroll_into_view_if_needed()
            # move the batch-size slider one step right with the keyboard, then press Run
            slider = page.locator(".memlab-batch").last
            readout = slider.locator(".widget-readout")
            old = int(readout.inner_text().strip())
            slider.locator(".noUi-handle").first.focus()
            page.keyboard.press("ArrowRight")
            page.wait_for_function(
                "([el, old]) => parseInt(el.textContent) !== old",
                arg=[readout.element_handle(), old], timeout=10_000)
            new = int(readout.inner_text().strip())
            assert new != old
            page.locator("button.memlab-run").last.click()
            page.wait_for_function(f"({BARS_JS})() > {before}", timeout=120_000, polling=250)
            status = page.locator(".memlab-status").last
            page.wait_for_function("el => el.textContent.includes('done')",
                                   arg=status.element_handle(), timeout=60_000)
            assert f"B{new}" in page.locator(".memlab-table").last.inner_text()
            assert page.evaluate(BARS_JS) == before + 1
            time.sleep(1.0)                              # let the last redraw settle
            dash.scroll_into_view_if_needed()
            dash.screenshot(path=str(ARTIFACTS / "browser_tutorial00.png"))
            assert _screenshot_figures(page, NOTEBOOK) >= 4
        except Exception:
            _on_failure(page, console, "tutorial00")
            raise
        finally:
            browser.close()


def test_tutorial03_calculator_bars_readable(lab_url):
    """The calculator's log axis fits its two bars and GPU lines: both bars are tall enough to
    read and compare, the labels of the lines are inside the plot (not at 10^80)."""
    from playwright.sync_api import sync_playwright

    notebook = "03_samplewise_transducer.ipynb"
    ARTIFACTS.mkdir(exist_ok=True)
    console = []
    with sync_playwright() as pw:
        browser = _browser(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        try:
            _run_all(page, lab_url, notebook)
            page.wait_for_function(f"({CALCULATOR_JS})() !== null", timeout=60_000,
                                   polling=250)
            time.sleep(1.0)                              # let the last redraw settle
            calc = page.evaluate(CALCULATOR_JS)
            h = calc["plot_height"]
            assert h > 150, calc
            assert len(calc["bars"]) == 2, calc
            for bar in calc["bars"]:                     # both bars readable: >= 8% and 15 px
                assert bar >= max(15.0, 0.08 * h), calc
            assert max(calc["bars"]) <= h + 1, calc
            labels = {a["text"]: a for a in calc["labels"]}
            assert len(calc["lines"]) == 2, calc
            for name in ("H100 (80 GB)", "16 GB GPU"):
                assert name in labels, calc
                assert -2 <= labels[name]["bottom"] <= h + 2, calc   # inside the plot area
                # right above its line (add_hline's label on a log axis went to 10^80)
                assert min(abs(labels[name]["bottom"] - y) for y in calc["lines"]) <= 12, calc
            plot = page.locator(".js-plotly-plot", has_text="Loss step").first
            plot.scroll_into_view_if_needed()
            plot.screenshot(path=str(ARTIFACTS / "browser_tutorial03_calculator.png"))
            assert _screenshot_figures(page, notebook) >= 6
        except Exception:
            _on_failure(page, console, "tutorial03")
            raise
        finally:
            browser.close()


@pytest.mark.parametrize("notebook", ["01_reversible_networks.ipynb", "02_8bit_optimizers.ipynb",
                                      "04_lowrank_gradients.ipynb"])
def test_tutorial_runs_and_figures_saved(lab_url, notebook):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    console = []
    with sync_playwright() as pw:
        browser = _browser(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        try:
            _run_all(page, lab_url, notebook)
            time.sleep(1.0)                              # let the last redraw settle
            assert _screenshot_figures(page, notebook) >= 3
        except Exception:
            _on_failure(page, console, Path(notebook).stem)
            raise
        finally:
            browser.close()
