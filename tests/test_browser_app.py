"""What a learner sees without a kernel, and the classroom app, in a real Chromium.

* ``memlab compare --plot``'s HTML opened with every non-file request blocked: the breakdown
  figure is drawn (its bar traces and paths in the SVG);
* ``memlab lab --app`` (Voila, the dashboard alone) on 127.0.0.1 with its token: refused
  without the token; with it, move the batch-size slider, press Run, a new bar appears.

Screenshots under artifacts/ (browser_app_*.png). Skips without /usr/bin/chromium, playwright
or voila.
"""

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from test_browser import BARS_JS, CHROMIUM, CHROMIUM_ARGS, _free_port

# pytest-xdist (-n 2 --dist loadgroup): one JupyterLab/Voila and Chromium at a time
pytestmark = [pytest.mark.browser,
              pytest.mark.xdist_group("browser")]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
# JS: traces and drawn bar paths of the "Memory at the peak" figure (null while not drawn)
PEAK_JS = """() => {
  for (const plot of document.querySelectorAll('.js-plotly-plot')) {
    const title = plot.querySelector('.gtitle');
    if (!title || !title.textContent.includes('Memory at the peak')) continue;
    return {traces: plot.querySelectorAll('.barlayer .trace').length,
            paths: plot.querySelectorAll('.barlayer .trace .point path').length};
  }
  return null;
}"""


def _skip_without_browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    pytest.importorskip("playwright.sync_api")


def _offline(page, blocked):
    def handle(route):
        if route.request.url.startswith(("file:", "data:", "blob:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()
    page.route("**/*", handle)


def test_compare_plot_html_offline(tmp_path):
    _skip_without_browser()
    from playwright.sync_api import sync_playwright

    from memlab import cli
    out = tmp_path / "runs.html"
    assert cli.main(["compare", "--task", "speaker", "--steps", "3", "--optimizer",
                     "adam,adam8bit", "--plot", str(out)]) == 0
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1400})
            blocked = []
            _offline(page, blocked)
            page.goto(out.as_uri())
            page.wait_for_function(f"({PEAK_JS})() !== null", timeout=30_000)
            peak = page.evaluate(PEAK_JS)
            assert peak["traces"] == 5, peak              # one trace per category
            assert page.evaluate(BARS_JS) == 2            # two runs, two bars
            assert peak["paths"] >= 2 * 3, peak           # stacked segments drawn
            assert page.locator(".js-plotly-plot").count() == 3
            assert blocked == []                          # nothing asked of the network
            page.screenshot(path=str(ARTIFACTS / "browser_app_compare_plot.png"), full_page=True)
        finally:
            browser.close()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    _skip_without_browser()
    pytest.importorskip("voila")
    from memlab.cli import app_launch
    private = tmp_path_factory.mktemp("app")
    os.chmod(private, 0o700)
    port = _free_port()
    token = "t" + os.urandom(16).hex()
    cmd, env, cwd = app_launch(port, token, private)
    assert token not in " ".join(cmd)
    assert (private / "voila.json").stat().st_mode & 0o077 == 0
    env.update(MEMLAB_FAST="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get(
                   "PYTHONPATH", "").split(os.pathsep) if p]),
               JUPYTER_RUNTIME_DIR=str(private / "runtime"))
    log = open(private / "voila.log", "wb")
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"voila exited with {proc.returncode}: "
                                   f"{(private / 'voila.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except urllib.error.HTTPError:
                break                                     # it answers
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("voila did not answer")
                time.sleep(0.5)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        try:
            os.killpg(proc.pid, signal.SIGKILL)           # its kernels, by this group only
        except (ProcessLookupError, PermissionError):
            pass
        log.close()


def test_app_needs_token(app_url):
    base, _token = app_url
    req = urllib.request.Request(f"{base}/", method="GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read().decode(errors="replace")
            assert "memlab" not in body.lower() or "login" in r.url, r.url
            assert "login" in r.url
    except urllib.error.HTTPError as e:
        assert e.code in (401, 403)


def test_app_slider_run_new_bar(app_url):
    from playwright.sync_api import sync_playwright

    base, token = app_url
    ARTIFACTS.mkdir(exist_ok=True)
    console = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        try:
            page.goto(f"{base}/?token={token}", timeout=180_000)
            page.wait_for_selector(".memlab-batch .noUi-handle", timeout=180_000)
            page.wait_for_function(f"({BARS_JS})() >= 0", timeout=60_000, polling=250)
            before = page.evaluate(BARS_JS)
            slider = page.locator(".memlab-batch").first
            readout = slider.locator(".widget-readout")
            old = int(readout.inner_text().strip())
            slider.locator(".noUi-handle").first.focus()
            page.keyboard.press("ArrowRight")
            page.wait_for_function("([el, old]) => parseInt(el.textContent) !== old",
                                   arg=[readout.element_handle(), old], timeout=10_000)
            new = int(readout.inner_text().strip())
            page.locator("button.memlab-run").first.click()
            page.wait_for_function(f"({BARS_JS})() > {before}", timeout=180_000, polling=250)
            status = page.locator(".memlab-status").first
            page.wait_for_function("el => el.textContent.includes('done')",
                                   arg=status.element_handle(), timeout=120_000)
            assert f"B{new}" in page.locator(".memlab-table").first.inner_text()
            assert page.evaluate(BARS_JS) == before + 1
            time.sleep(1.0)
            page.screenshot(path=str(ARTIFACTS / "browser_app_voila.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "browser_app_failure.png"), full_page=True)
            print("\n".join(console[-60:]))
            raise
        finally:
            browser.close()
