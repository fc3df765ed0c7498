"""Pages as a person sees them: a report written by `modelsense report` (the HTML renderer of the demo's
report.html) and the built docs' start page, opened in headless Chromium. Checks that every image
loaded (natural width > 0) and that the page logged no uncaught errors, and saves a full-page screenshot
for review (MODELSENSE_SCREENSHOTS=DIR keeps them; else the test's temporary folder). Skipped when no
Chromium is installed (Debian: `apt-get install chromium`); CI does not install it."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))), None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium); "
                                                          "the browser check of the report and the docs is skipped")]

# appended to a copy of the page: after load, the images that did not load, as JSON in <pre id=ms-check>
PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const bad = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 80));
  const out = document.createElement('pre'); out.id = 'ms-check';
  out.textContent = JSON.stringify({images: imgs.length, broken: bad});
  document.body.appendChild(out);
});</script>"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", *args],
                          capture_output=True, text=True, timeout=120)


def check_page(page: Path, shots: Path, name: str, base_url: str | None = None, root: Path | None = None) -> dict:
    """Open `page` in Chromium: images loaded, no uncaught errors; a screenshot `shots/name.png`. With
    `base_url` (a server of the folder `root`) the page is loaded over HTTP, as a user browses a site."""
    probe = page.with_name(f"probe-{page.name}")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))

    def url(path: Path) -> str:
        return path.as_uri() if base_url is None else f"{base_url}/{path.relative_to(root).as_posix()}"

    try:
        done = _chromium("--dump-dom", url(probe))
    finally:
        probe.unlink()
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="ms-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the page did not finish loading: {done.stderr[-2000:]}"
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert not result["broken"], f"images that did not load: {result['broken']}"
    errors = [line for line in done.stderr.splitlines() if "Uncaught" in line]
    assert not errors, errors
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / f"{name}.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,6000", url(page))
    assert shot.is_file() and shot.stat().st_size > 0
    return result


def _shots(tmp_path: Path) -> Path:
    return Path(os.environ.get("MODELSENSE_SCREENSHOTS", tmp_path / "screenshots"))


def test_report_in_a_browser(tmp_path):
    from dataclasses import replace

    from modelsense.data import DataConfig
    from modelsense.experiments.command import execute
    from modelsense.experiments.influence import NOISY_LABELS, NoisyLabelsSpec
    from modelsense.experiments.runs_report import report_runs
    from modelsense.experiments.train import TRAIN, TrainSpec
    from modelsense.models import ModelConfig
    from modelsense.training import TrainConfig

    data, net, fast = DataConfig(n_train=60), ModelConfig(widths=(8,)), TrainConfig(epochs=2, bs=32)
    execute(TRAIN, TrainSpec(data, net, fast), tmp_path / "a", progress=False)
    execute(TRAIN, TrainSpec(data, net, replace(fast, seed=1)), tmp_path / "b", progress=False)
    execute(NOISY_LABELS, NoisyLabelsSpec(replace(data, corruption_ratio=0.2), net, fast, methods=("loss",)),
            tmp_path / "noisy", progress=False)
    page = report_runs([tmp_path / "a", tmp_path / "b", tmp_path / "noisy"], tmp_path / "report")
    result = check_page(page, _shots(tmp_path), "report")
    assert result["images"] == 5  # overlay, two learning curves, histograms, detection curves


def test_docs_start_page_in_a_browser(tmp_path):
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("mkdocs", "material", "mkdocstrings")):
        pytest.skip("the docs extra is not installed: `make docs` or `pip install -e '.[docs]'`")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    # over HTTP, as the site is browsed (from file:// the theme's search index cannot load)
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        check_page(site / "index.html", _shots(tmp_path), "docs_index", base, site)
        check_page(site / "tutorials" / "mpe" / "index.html", _shots(tmp_path), "docs_mpe", base, site)
    finally:
        server.shutdown()
