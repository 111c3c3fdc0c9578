"""Stage 5: the feature browser in a real browser (headless Chromium, offline, file://).

Skipped only where Chromium is absent (Debian: `apt-get install chromium`). `--dump-dom`
returns the DOM after the page's scripts ran: the index's table rows exist only if its JS
worked. Every page installs a window.onerror hook that writes uncaught errors into
#js-errors; the canary test proves the hook reports a real error, so an empty #js-errors
means no error. Screenshots land in the test's tmp dir.
"""

import re
import shutil
import subprocess

import pytest
from test_pages import HOSTILE_TOKEN, N_FEATURES, check_page_is_inert, synthetic_tables

from mono import pages, store

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-extensions", "--hide-scrollbars")


def chromium(tmp_path, url: str, *args: str) -> str:
    """Run headless Chromium on url with its own profile dir; -> stdout."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    proc = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def js_errors(dom: str) -> str:
    match = re.search(r'<pre id="js-errors"[^>]*>(.*?)</pre>', dom, re.S)
    assert match, "the page has its #js-errors element"
    return match.group(1)


@pytest.fixture(scope="module")
def browser_pages(tmp_path_factory):
    adir = str(tmp_path_factory.mktemp("browser") / "analysis" / "t")
    synthetic_tables(adir)
    return pages.feature_browser(adir)


def test_error_hook_reports_uncaught_errors(tmp_path):
    page = tmp_path / "canary.html"
    page.write_text(pages._page("canary", "<p>x</p>", "<script>no_such_function();</script>"))
    dom = chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert "no_such_function" in js_errors(dom)


def test_index_renders_every_feature_without_errors(tmp_path, browser_pages):
    url = "file://" + browser_pages
    dom = chromium(tmp_path, url, "--dump-dom")
    assert js_errors(dom) == ""
    assert 'data-rendered="7"' in dom
    body = re.search(r"<tbody>(.*)</tbody>", dom, re.S).group(1)
    assert body.count("<tr") == N_FEATURES
    assert re.findall(r'href="features/(\d+)\.html"', body) == [str(i) for i in range(N_FEATURES)]
    assert pages.esc(HOSTILE_TOKEN) in body           # rendered as text by textContent
    check_page_is_inert(dom)                          # no element came out of the data
    shot = tmp_path / "index.png"
    chromium(tmp_path, url, f"--screenshot={shot}", "--window-size=1280,900")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_index_filters_and_sorts_from_the_url_hash(tmp_path, browser_pages):
    dom = chromium(tmp_path, "file://" + browser_pages + "#cls=dense&sort=3&dir=-1",
                   "--dump-dom")
    assert js_errors(dom) == "" and 'data-rendered="3"' in dom
    body = re.search(r"<tbody>(.*)</tbody>", dom, re.S).group(1)
    assert re.findall(r'href="features/(\d+)\.html"', body) == ["6", "5", "4"]  # by max act
    dom = chromium(tmp_path, "file://" + browser_pages + "#q=tok2", "--dump-dom")
    assert js_errors(dom) == "" and 'data-rendered="5"' in dom  # the alive features but one


def test_feature_page_loads_without_errors(tmp_path, browser_pages):
    page = store.join(browser_pages.rsplit("/", 1)[0], "features", "3.html")
    dom = chromium(tmp_path, "file://" + page, "--dump-dom")
    assert js_errors(dom) == ""
    assert dom.count("<mark") == 5 + 2 + 1             # top 5, intervals 4 and 1
    check_page_is_inert(dom)
    shot = tmp_path / "feature.png"
    chromium(tmp_path, "file://" + page, f"--screenshot={shot}", "--window-size=1280,900")
    assert shot.stat().st_size > 10_000
