"""End-to-end test of the ipywidgets query browser in a real browser.

JupyterLab is started on localhost, a small notebook that shows the
:class:`~remap_lib.app.browser.QueryBrowser` is opened in headless Chromium (the
system's ``chromium``, driven by Playwright; nothing is downloaded), run, and
the widgets are used the way a person would: a query button is clicked and the
"scales S" slider is moved with the keyboard.  After each step the rankings the
page shows (``data-ranking`` of ``.remap-results``) must equal the rankings a
browser with the same settings computes in this process.  A screenshot is kept
in ``runs/test-artifacts/query_browser.png``.

Needs ``chromium`` on PATH (``.ci/ensure_chromium`` installs it on Debian) and
the ``playwright`` and ``jupyterlab`` packages (the ``test`` extra); skipped
otherwise.  ``playwright install`` is never needed.
"""

from __future__ import annotations

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

REPO = Path(__file__).resolve().parents[1]
ARTIFACT = REPO / "runs" / "test-artifacts" / "query_browser.png"

# Query 0 first, then query 3 (its ranking differs from query 0's), then
# S = 4 -> 3 with one ArrowLeft (query 3's rankings differ between S = 4 and 3).
CLICKED_QUERY = 3
TIMEOUT_MS = 180_000

# One source for both sides: exec'd here for the expected rankings and run as
# the notebook's cell in the JupyterLab kernel.
SETUP_SRC = '''\
import warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads({threads})
from remap_lib.data.datasets import RetrievalDataset, load_dataset
from remap_lib.app.browser import QueryBrowser

def demo_subset(n_images=40, queries=(0, 2, 4, 6, 8, 10)):
    """The first n_images database images of the demo set and a few of its queries."""
    full = load_dataset("demo")
    keep = lambda ids: [i for i in ids if i < n_images]
    gnd = {{p: [{{"ok": keep(e[q]["ok"]), "junk": keep(e[q].get("junk", []))}} for q in queries]
           for p, e in full.gnd.items()}}
    return RetrievalDataset(name="demo-subset", images=full.images[:n_images],
                            queries=[full.queries[q] for q in queries], gnd=gnd,
                            groups=full.groups[:n_images] if full.groups else None, primary=full.primary)

browser = QueryBrowser(demo_subset(), image_size=192)
'''


def _ranking_attr(browser) -> str:
    """What ``results_html`` writes into ``data-ranking``."""
    return ";".join(f"{h}:{','.join(map(str, browser.ranking(h)))}" for h in ("rmac", "remap"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def _request(url: str, method: str) -> None:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10).close()
    except Exception:
        pass


@pytest.fixture
def browser_tools():
    """(chromium path, playwright's sync_playwright); skips when one is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium, or run .ci/ensure_chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (pip install -e .[test])")
    pytest.importorskip("jupyterlab_widgets", reason="jupyterlab_widgets is not installed (ipywidgets frontend)")
    return chromium, sync_api.sync_playwright


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on 127.0.0.1 serving ``tmp_path/nb``, isolated from any user configuration."""
    root, home = tmp_path / "nb", tmp_path / "jupyter"
    root.mkdir()
    dirs = {name: home / name for name in ("config", "data", "runtime", "settings", "workspaces")}
    for d in dirs.values():
        d.mkdir(parents=True)
    # The kernel is this interpreter, whatever kernelspecs exist elsewhere.  (The lab
    # extensions, e.g. the widgets frontend, live under sys.prefix/share/jupyter,
    # which stays on the data path.)
    kdir = dirs["data"] / "kernels" / "remap-test"
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "remap test kernel", "language": "python"}))
    # No announcements / update checks, no pop-ups over the notebook.
    notif = dirs["settings"] / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notif.parent.mkdir(parents=True)
    notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    (dirs["config"] / "jupyter_server_config.json").write_text(json.dumps({
        "LabApp": {"news_url": None, "expose_app_in_browser": True},
        "ServerApp": {"open_browser": False}}))

    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "JPY_"))}
    env.update(JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_DATA_DIR=str(dirs["data"]),
               JUPYTER_RUNTIME_DIR=str(dirs["runtime"]), JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
               JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    log = open(tmp_path / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--port-retries=0",
         "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--ServerApp.terminals_enabled=False", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited ({proc.returncode}):\n{(tmp_path / 'jupyterlab.log').read_text()[-4000:]}")
            try:
                _get_json(f"{base}/api/status?token={token}")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab not up after 120 s:\n{(tmp_path / 'jupyterlab.log').read_text()[-4000:]}")
                time.sleep(0.5)
        yield {"base": base, "token": token, "root": root, "log": tmp_path / "jupyterlab.log"}
    finally:
        # The kernels run in sessions of their own: shut them down through the
        # server, then the server; kill what is left, by pid.
        children = []
        try:
            import psutil

            children = psutil.Process(proc.pid).children(recursive=True)
        except Exception:
            pass
        if proc.poll() is None:
            try:
                for k in _get_json(f"{base}/api/kernels?token={token}"):
                    _request(f"{base}/api/kernels/{k['id']}?token={token}", "DELETE")
            except Exception:
                pass
            _request(f"{base}/api/shutdown?token={token}", "POST")
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        for child in children:
            try:
                child.kill()
            except Exception:
                pass
        log.close()


def _write_notebook(path: Path, source: str) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "remap-test", "display_name": "remap test kernel", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# Query browser (browser test)"),
                nbformat.v4.new_code_cell(source + "browser.widget")]
    nbformat.write(nb, path)


def _shown(page, timeout=TIMEOUT_MS, **attrs) -> dict:
    """Wait for ``.remap-results`` with these data-* attributes; return all its data-* attributes."""
    selector = ".remap-results" + "".join(f'[data-{k}="{v}"]' for k, v in attrs.items())
    el = page.wait_for_selector(selector, state="attached", timeout=timeout)
    return {k: el.get_attribute(f"data-{k}") for k in ("query", "scales", "ranking")}


@pytest.mark.browser
@pytest.mark.slow
def test_query_browser_in_jupyterlab(browser_tools, lab):
    chromium, sync_playwright = browser_tools
    import torch

    # One torch thread on both sides: the same arithmetic (so the same rankings, ties
    # included) here and in the kernel, and no thread oversubscription on a busy machine.
    source = SETUP_SRC.format(threads=1)
    t0 = time.monotonic()

    # The expected rankings, computed here (before the kernel starts: one torch job at a time).
    threads = torch.get_num_threads()
    try:
        ns: dict = {}
        exec(compile(source, "<browser-setup>", "exec"), ns)
        ref = ns["browser"]
        first_scales = ref.scales
        expected = {"initial": _ranking_attr(ref)}
        ref.select(CLICKED_QUERY)
        expected["query"] = _ranking_attr(ref)
        ref.set_scales(first_scales - 1)
        expected["scales"] = _ranking_attr(ref)
    finally:
        torch.set_num_threads(threads)
    print(f"[{time.monotonic() - t0:5.1f} s] expected rankings: {expected}")
    # The test only means something if each step changes what is shown.
    assert len(set(expected.values())) == 3, expected
    del ns, ref

    _write_notebook(lab["root"] / "browser.ipynb", source)
    url = f"{lab['base']}/lab/tree/browser.ipynb?token={lab['token']}&reset"

    with sync_playwright() as p:
        chrome = p.chromium.launch(
            executable_path=chromium, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-extensions", "--disable-component-update", "--disable-default-apps",
                  "--no-first-run", "--no-default-browser-check", "--mute-audio"])
        try:
            page = chrome.new_page(viewport={"width": 1400, "height": 1500})
            page.set_default_timeout(TIMEOUT_MS)
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            try:
                page.goto(url, wait_until="domcontentloaded")
                page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=TIMEOUT_MS)
                page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                       " && window.jupyterapp.shell.currentWidget.sessionContext")
                # Wait for the kernel, then Run > Run All Cells (by its command id).
                page.evaluate("""async (ms) => {
                    const app = window.jupyterapp, panel = app.shell.currentWidget;
                    const late = new Promise((_, no) => setTimeout(() => no(new Error(`no kernel after ${ms} ms`)), ms));
                    await Promise.race([Promise.all([panel.context.ready, panel.sessionContext.ready]), late]);
                    app.commands.execute('notebook:run-all-cells');  // not awaited: _shown has the timeout
                }""", TIMEOUT_MS)

                print(f"[{time.monotonic() - t0:5.1f} s] notebook running")
                shown = _shown(page, query=0)
                print(f"[{time.monotonic() - t0:5.1f} s] initial results shown")
                assert shown == {"query": "0", "scales": str(first_scales), "ranking": expected["initial"]}

                page.get_by_role("button", name=f"query {CLICKED_QUERY}", exact=True).click()
                shown = _shown(page, query=CLICKED_QUERY)
                print(f"[{time.monotonic() - t0:5.1f} s] query {CLICKED_QUERY} shown")
                assert shown == {"query": str(CLICKED_QUERY), "scales": str(first_scales),
                                 "ranking": expected["query"]}

                handle = page.locator(".widget-slider", has_text="scales S").locator(".noUi-handle")
                handle.focus()
                handle.press("ArrowLeft")
                shown = _shown(page, scales=first_scales - 1)
                print(f"[{time.monotonic() - t0:5.1f} s] S = {first_scales - 1} shown")
                assert shown == {"query": str(CLICKED_QUERY), "scales": str(first_scales - 1),
                                 "ranking": expected["scales"]}
                assert page.locator(".widget-slider", has_text="scales S").locator(".widget-readout") \
                    .inner_text().strip() == str(first_scales - 1)
            except Exception:
                print("browser console:\n" + "\n".join(console[-50:]))
                print("jupyterlab log (tail):\n" + lab["log"].read_text()[-4000:])
                raise
            finally:
                try:
                    page.locator(".remap-results").first.scroll_into_view_if_needed(timeout=5000)
                except Exception:
                    pass
                ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACT), full_page=True)
                print(f"screenshot: {ARTIFACT}")
        finally:
            chrome.close()


def test_widget_changes_repool_the_kept_maps_without_the_backbone(photo_dir):
    """The browser's one backbone pass is its build: scales, layers and weighting only re-pool the kept maps."""
    import numpy as np
    import torch

    from remap_lib.nets.backbones import build_backbone
    from remap_lib.app.browser import QueryBrowser
    from remap_lib.data.datasets import RetrievalDataset
    from remap_lib.evaluation.evaluate import describe
    from remap_lib.data.images import ImageSpec
    from remap_lib.training.klw import KLWeights
    from remap_lib.layers.pooling import region_count

    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0", weights="random")
    calls = [0]
    backbone.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    photos = [ImageSpec(str(p)) for p in sorted(photo_dir.glob("*.png"))]
    queries = [ImageSpec(photos[1].path, box=(10, 5, 110, 80)), photos[4]]
    ds = RetrievalDataset("photos", photos, queries, {"map": [{"ok": [1], "junk": []}, {"ok": [3], "junk": [4]}]})
    layers = backbone.resolve_layers([1, 2])
    alpha = {layer: np.linspace(0.2, 2.0, region_count(3)).astype(np.float32) for layer in layers}
    klw = KLWeights(alpha, {"backbone": "efficientnet_lite0", "levels": 3, "full_map": False}, {})
    browser = QueryBrowser(ds, image_size=96, kl_weights=klw, backbone=backbone, engine="torch", device="cpu")
    built = calls[0]
    assert built == 4  # database (96×96, 96×64) and queries (crop 96×70, 96×64): one batch each
    for change in (lambda: browser.set_scales(3), lambda: browser._set(layers="1"),
                   lambda: browser._set(layers="1+2"), lambda: browser._set(weighting="KL"), lambda: browser.select(1)):
        calls[0] = 0
        change()
        shown = {head: browser.descriptors(head) for head in ("rmac", "remap")}
        assert calls[0] == 0  # re-pooled, no CNN
        for head, (db, q, _) in shown.items():
            expected = describe(browser.model(head), ds, None, "cpu", progress=False, engine="torch")
            np.testing.assert_allclose(db, expected[0], atol=1e-6)
            np.testing.assert_allclose(q, expected[1], atol=1e-6)
    # pooled once per setting shown: the first view (S = 4), then S = 3, layer 1 alone, KL weights
    assert set(browser.cache) == {("rmac", 4, (1,), "uniform"), ("remap", 4, (1, 2), "uniform"),
                                  ("rmac", 3, (1,), "uniform"), ("remap", 3, (1, 2), "uniform"),
                                  ("remap", 3, (1,), "uniform"), ("remap", 3, (1, 2), "KL")}
    kl, uniform = browser.descriptors("remap")[0], describe(browser.model("remap"), ds, None, "cpu",
                                                            progress=False, engine="torch")[0]
    assert browser.weighting == "KL" and not np.allclose(kl, browser.cache[("remap", 3, (1, 2), "uniform")][0])
    np.testing.assert_allclose(kl, uniform, atol=1e-6)  # model() carries the KL α
    assert 'data-scales="3"' in browser.output.value and 'data-query="1"' in browser.output.value
