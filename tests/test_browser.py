"""JupyterLab in a real browser: open 02_gates, Run All, use the explorer, save and reopen.

Drives Debian's chromium headless with playwright (``executable_path``: playwright's own browser
download cannot work offline). Skipped, saying why, when there is no browser or no playwright:
``.ci/run`` installs chromium, the ``dev`` extra playwright. Screenshots of the explorer before
and after the interaction go to ``$SEGMOE_LAB_SCREENSHOTS`` (default: the test's temporary folder;
``docs/`` holds the committed ones).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BROWSER = os.environ.get("SEGMOE_LAB_BROWSER", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
TOKEN = "segmoe-lab-browser-test"
# JupyterLab settings for an offline, fully rendered notebook: no news or update checks (they
# would fetch from the network), and every cell in the DOM (no windowing).
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(BROWSER, os.X_OK),
                       reason=f"no browser at {BROWSER}: apt-get install chromium (.ci/run does) to run the JupyterLab test"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server over a copy of notebooks/ (so saving leaves the repository alone)."""
    work = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", work / "notebooks")
    for name, values in SETTINGS.items():
        path = work / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "JUPYTERLAB_SETTINGS_DIR": str(work / "settings"),
           "JUPYTER_RUNTIME_DIR": str(work / "runtime"), "HF_HUB_OFFLINE": "1"}
    env.pop("SEGMOE_LAB_STATIC", None)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={work / 'notebooks'}",
           "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers run as root
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "w"))
    for _ in range(240):  # the server's first start builds nothing, but a loaded machine is slow
        assert server.poll() is None, f"JupyterLab exited: {(work / 'server.log').read_text()[-2000:]}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}", work
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=BROWSER, args=ARGS)
        yield b
        b.close()


NOTEBOOK_STATE = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.content.model || !panel.sessionContext.session) return null;
  const cells = [];
  for (const cell of panel.content.model.cells) {
    if (cell.type !== 'code') continue;
    cells.push({count: cell.executionCount, errors: cell.outputs.toJSON().filter(o => o.output_type === 'error')
                .map(o => o.ename + ': ' + o.evalue)});
  }
  return {cells, status: panel.sessionContext.kernelDisplayStatus};
}"""


def _offline(page, url: str) -> list[str]:
    """Answer every request that leaves the server with an empty SVG, as a machine without network
    would see nothing there, yet without console noise; returns the list of such URLs (the markdown's
    Colab badge image is the only one expected)."""
    asked = []

    def answer(route):
        asked.append(route.request.url)
        route.fulfill(status=200, content_type="image/svg+xml", body="<svg xmlns='http://www.w3.org/2000/svg'/>")

    page.route(lambda u: not u.startswith(url), answer)
    return asked


def _state(page):
    return page.evaluate(NOTEBOOK_STATE)


def _wait_for_notebook(page, url):
    page.goto(f"{url}/lab/tree/02_gates.ipynb?token={TOKEN}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.kernelDisplayStatus === 'idle'",
                           timeout=180_000)


def _explorer_images(page) -> list[str]:
    """The src of every image the explorer shows (its panels, then the snapshot beside it)."""
    return page.evaluate("""() => Array.from(document.querySelectorAll('.jp-OutputArea img'))
        .filter(img => img.closest('.widget-vbox') || img.closest('.jp-OutputArea-child')
                       && img.closest('.jp-Cell').querySelector('.widget-vbox'))
        .map(img => img.src)""")


def _dropdown(page, label: str):
    return page.locator(f".widget-dropdown:has(label:text-is('{label}')) select")


def test_jupyterlab_runs_02_gates_and_its_explorer_responds(lab, browser):
    url, work = lab
    shots = Path(os.environ.get("SEGMOE_LAB_SCREENSHOTS") or work)
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1500, "height": 2300})  # the whole explorer in view
    console = []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console.append(str(e)))
    external = _offline(page, url)
    _wait_for_notebook(page, url)

    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(f"() => {{ const s = ({NOTEBOOK_STATE})(); return s && s.status === 'idle'"
                           " && s.cells.every(c => c.count !== null) }", timeout=900_000, polling=2000)
    state = _state(page)
    assert not [c["errors"] for c in state["cells"] if c["errors"]], f"error outputs: {state['cells']}"

    prompt, step = _dropdown(page, "prompt"), _dropdown(page, "step")
    prompt.wait_for(timeout=60_000)
    selected = step.evaluate("s => s.options[s.selectedIndex].text").replace("\xa0", " ")  # ipywidgets: nbsp
    assert selected == "mean over steps"  # not blank
    explorer = page.locator(".widget-vbox").first
    explorer.scroll_into_view_if_needed()
    explorer.screenshot(path=str(shots / "explorer_before.png"))
    before = _explorer_images(page)

    heatmap_changed = "b => { const s = " + _explorer_js() + "; return s.length >= 4 && s[0] !== b }"
    prompt.select_option(index=1)
    page.wait_for_function(heatmap_changed, arg=before[0], timeout=120_000)
    page.wait_for_timeout(5000)  # the other panels follow the heatmap
    middle = _explorer_images(page)
    step.select_option(label="0")
    page.wait_for_function(heatmap_changed, arg=middle[0], timeout=120_000)  # mean over steps -> step 0
    page.wait_for_timeout(5000)
    after = _explorer_images(page)
    explorer.screenshot(path=str(shots / "explorer_after.png"))
    assert len(before) >= 4 and len(after) >= 4, (before, after)
    assert before[0] != middle[0] != after[0], "the heatmap did not change with the prompt and the step"
    assert not console, f"browser console errors: {console}"
    assert all(u.startswith("https://colab.research.google.com/assets/") for u in external), external
    page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")  # for the reopening test below
    saved = work / "notebooks" / "02_gates.ipynb"
    for _ in range(60):  # the save is asynchronous: wait for the executed notebook on disk
        if '"execution_count": null' not in saved.read_text():
            break
        time.sleep(1)
    page.close()


def test_a_saved_and_reopened_explorer_still_shows_its_view(lab, browser):
    url, work = lab
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    _wait_for_notebook(page, url)  # the notebook the first test ran and saved (same server)
    page.evaluate("window.jupyterapp.commands.execute('kernelmenu:shutdown')")  # no widget models left
    page.wait_for_timeout(2000)
    saved = json.loads((work / "notebooks" / "02_gates.ipynb").read_text())
    explorer = next(c for c in saved["cells"] if c["cell_type"] == "code" and "explore(recording)" in "".join(c["source"]))
    assert any("image/png" in o.get("data", {}) for o in explorer["outputs"]), "no static view saved beside the widget"
    page.reload()
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget", timeout=180_000)
    page.wait_for_timeout(3000)
    cell = page.locator(".jp-CodeCell", has_text="explore(recording)").first
    cell.scroll_into_view_if_needed()
    assert cell.locator(".jp-OutputArea img").count() >= 1, "the reopened explorer cell shows no static view"


def _explorer_js() -> str:
    return """Array.from(document.querySelectorAll('.jp-OutputArea img'))
        .filter(img => img.closest('.widget-vbox') || img.closest('.jp-OutputArea-child')
                       && img.closest('.jp-Cell').querySelector('.widget-vbox'))
        .map(img => img.src)"""
