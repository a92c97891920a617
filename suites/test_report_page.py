"""report.html in a real browser: headless Chromium opens a report built from a small synthetic
input (a verify.json with pass, FAIL, dev, n/s, XPASS and waived results; hostile and very long
names) and the test fails on a broken page: a JavaScript error, an image that does not load, an
element sticking out of the page outside a scrolling wrapper. It saves a screenshot.

Chromium is driven from the command line, no Python dependency: ``--dump-dom`` prints the page
after a checking script (injected into a copy of the page) has written what it found into a
``<pre id=bnbench-check>``; ``--enable-logging=stderr`` shows uncaught errors; everything is
``file://`` and host names resolve to nothing (no network). The tests skip when no chromium or
chromium-browser is on PATH (.ci/run installs it where apt-get is available).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from bnbench.results import BENCH_SCHEMA, COLUMNS, VERIFY_SCHEMA

from helpers import in_process

# Writes {"problems": [...], counts} into <pre id=bnbench-check> once the page has loaded.
# An element whose right edge is beyond the page is a problem unless an ancestor scrolls or
# clips it (a wide table inside its .scroll wrapper); so is a page wider than the window.
CHECK = """<script>
(function () {
  var problems = [];
  window.addEventListener('error', function (e) { problems.push('js error: ' + e.message); });
  function clipped(el) {
    for (var p = el.parentElement; p && p !== document.body; p = p.parentElement) {
      var o = getComputedStyle(p).overflowX;
      if (o === 'auto' || o === 'scroll' || o === 'hidden') return true;
    }
    return false;
  }
  function describe(el) {
    return '<' + el.tagName.toLowerCase() + '> ' + (el.textContent || '').trim().slice(0, 60);
  }
  function check() {
    var root = document.documentElement, width = root.clientWidth;
    if (root.scrollWidth > width + 1) {
      problems.push('the page is wider than the window: ' + root.scrollWidth + ' > ' + width);
    }
    for (var i = 0; i < document.images.length; i++) {
      var img = document.images[i];
      if (!img.complete || img.naturalWidth === 0) problems.push('broken image: ' + img.alt);
    }
    var all = document.body.querySelectorAll('*'), wide = 0;
    for (var k = 0; k < all.length; k++) {
      var right = all[k].getBoundingClientRect().right;
      if (right > width + 1 && !clipped(all[k]) && wide++ < 20) {
        problems.push('sticks out of the page (' + Math.round(right) + ' > ' + width + '): ' +
                      describe(all[k]));
      }
    }
    var out = document.createElement('pre');
    out.id = 'bnbench-check';
    out.textContent = JSON.stringify({
      problems: problems,
      images: document.images.length,
      tables: document.querySelectorAll('table').length,
      wrapped: document.querySelectorAll('div.scroll > table').length,
      matrix_cells: document.querySelectorAll('table.matrix td').length,
      titled_cells: document.querySelectorAll('table.matrix td[title]').length,
      scripts: document.scripts.length
    });
    document.body.appendChild(out);
  }
  if (document.readyState === 'complete') check(); else window.addEventListener('load', check);
})();
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium or chromium-browser on PATH (Debian: apt-get install chromium)")


def open_in_browser(
    page: Path, tmp_path: Path, width: int, screenshot: Path | None = None
) -> tuple[dict, str]:
    """Opens a copy of ``page`` with the checking script in headless Chromium at ``width``
    pixels: (what the script found, Chromium's log)."""
    checked = page.with_name(f"checked-{width}-{page.name}")
    checked.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    command = [
        chromium(),
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no network, whatever the page asks for
        f"--user-data-dir={tmp_path / f'profile-{width}'}",
        f"--window-size={width},2000",
        "--virtual-time-budget=10000",
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        *([f"--screenshot={screenshot}"] if screenshot else []),
        checked.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="bnbench-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the checking script did not run:\n{done.stderr[-3000:]}"
    return json.loads(html.unescape(found.group(1))), done.stderr


HOSTILE = "<img src=x onerror=alert(1)>"  # a broken image if it were ever markup
LONG = "impl-with-a-name-that-never-breaks-" + "x" * 120


def synthetic_run(directory: Path) -> Path:
    """A small bench directory: four implementations (one with a hostile name, one with a very
    long one, one whose rows failed verification), two modes, a row that crashed, and a
    verify.json with every verdict, categories and reasons."""
    impls = {"builtin": 1.0, "vectorized": 2.0, HOSTILE: 0.5, LONG: 1.5}
    grid = pd.MultiIndex.from_product(
        [list(impls), ["forward_train", "backward"], [8, 32, 128]],
        names=["implementation", "mode", "batch_size"],
    ).to_frame(index=False)
    median = grid["implementation"].map(impls) * grid["batch_size"] * 1e-5
    rows = grid.assign(
        device="cpu",
        dtype="float32",
        channels=16,
        spatial="8x8",
        rank=4,
        shape=grid["batch_size"].astype(str) + "x16x8x8",
        memory_format="contiguous",
        status="ok",
        verified=grid["implementation"].map({HOSTILE: "fail"}).fillna("pass"),
        median_s=median,
        p20_s=median * 0.95,
        p80_s=median * 1.05,
        repetitions=5,
        ratio_to_floor=3.0,
        threads=2,
        model="",
        message="",
    )
    crashed = rows.iloc[[0]].assign(
        implementation="vectorized",
        mode="forward_eval",
        status="crashed",
        median_s=None,
        p20_s=None,
        p80_s=None,
        repetitions=None,
        message=HOSTILE + " worker died\n" + "y" * 400,
    )
    rows = pd.concat([rows, crashed], ignore_index=True)
    rows["repetitions"] = rows["repetitions"].astype("Int64")
    directory.mkdir(parents=True, exist_ok=True)
    rows.reindex(columns=COLUMNS).to_csv(directory / "results.csv", index=False)
    environment = {"schema": BENCH_SCHEMA, "host": "test", "complete": True, "cpu_count": 2}
    (directory / "environment.json").write_text(json.dumps(environment))
    verdicts = {
        "builtin": ["pass", "pass", "pass"],
        "vectorized": ["fail", "deviation", "pass"],
        HOSTILE: ["not-supported", "not-supported", "unexpected-pass"],
        LONG: ["not-supported", "waived", "pass"],
        "native": ["not-supported"] * 3,
    }
    messages = {
        "fail": "step 0: output " + HOSTILE,
        "deviation": "keeps the biased variance " + HOSTILE + "\nstep 0: running_var ...",
        "not-supported": "rank 4 input not supported; " + HOSTILE + " not supported",
        "unexpected-pass": "a declared deviation passed",
        "waived": "waived: we know " + "z" * 200,
        "pass": "",
    }
    checks = [("default", "numerics"), ("momentum_none", "running state"), ("wrong_rank", "")]
    results = [
        {
            "implementation": impl,
            "device": "cpu",
            "case": f"{check}-rank4",
            "check": check,
            "verdict": verdict,
            "message": messages[verdict],
            **({"category": category} if category else {}),
        }
        for impl, row in verdicts.items()
        for (check, category), verdict in zip(checks, row)
    ]
    (directory / "verify.json").write_text(
        json.dumps({"schema": VERIFY_SCHEMA, "results": results})
    )
    return directory


def links(page: str) -> list[str]:
    """Every src, href and srcset of the page's elements (attributes, not text that looks like
    them: the hostile names are shown as text)."""
    found: list[str] = []

    class Parser(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend(v or "" for k, v in attrs if k in ("src", "href", "srcset", "action"))

    Parser().feed(page)
    return found


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> Path:
    chromium()  # skip before spending time on the report
    root = tmp_path_factory.mktemp("page")
    run = synthetic_run(root / ("run-" + "long-source-name-" * 6))
    result = in_process("report", str(run), "--output", str(root / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "out" / "report.html"


def test_the_report_page_works_in_a_browser(report_page, tmp_path):
    page = report_page.read_text()
    assert "<script" not in page.lower()  # no JS at all
    # nothing to fetch: images are data URIs, links point inside the page
    targets = links(page)
    assert targets and all(t.startswith(("data:image/png;base64,", "#")) for t in targets)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    screenshot = tmp_path / "report.png"
    found, log = open_in_browser(report_page, tmp_path, 1280, screenshot)
    assert found["problems"] == [], found["problems"]
    assert found["scripts"] == 1  # the checking script only
    assert found["images"] >= 3  # the plots, as data URIs, all decoded
    assert found["tables"] >= 5 and found["wrapped"] == found["tables"]  # every table scrolls
    # the matrix: 3 checks x 4 columns (native@cpu, n/s everywhere, is dropped); each of the 7
    # cells that are not pass has its reasons on hover
    assert found["matrix_cells"] == 12 and found["titled_cells"] == 7
    assert "Uncaught" not in log, log[-3000:]
    assert screenshot.is_file() and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {screenshot}")


def test_the_report_page_fits_a_narrow_window(report_page, tmp_path):
    found, log = open_in_browser(report_page, tmp_path, 480)
    assert found["problems"] == [], found["problems"]
    assert "Uncaught" not in log


def test_the_page_check_finds_what_breaks_a_page(tmp_path):
    """The check itself: a script error, a broken image, a wide table outside a wrapper."""
    broken = tmp_path / "broken.html"
    broken.write_text(
        "<!doctype html><html><body><script>null.x();</script>"
        "<img alt=missing src='data:image/png;base64,AAAA'>"
        "<table><tr><td style='white-space:nowrap'>" + "w" * 400 + "</td></tr></table>"
        "<div style='overflow-x:auto'><table><tr><td style='white-space:nowrap'>"
        + "s" * 400
        + "</td></tr></table></div></body></html>"
    )
    found, log = open_in_browser(broken, tmp_path, 800)
    problems = "\n".join(found["problems"])
    assert "broken image: missing" in problems
    assert "the page is wider than the window" in problems
    assert "sticks out of the page" in problems and "wwww" in problems
    assert "ssss" not in problems  # inside a scrolling wrapper: fine
    assert "Uncaught TypeError" in log
