"""Feature splitting pages (mono.family_pages): the families index, family pages, the map and
the feature pages' links across sizes; escaped corpus text; the pages in a real browser."""

import os
import re

import numpy as np
import pytest
from test_browser import CHROMIUM, chromium, js_errors
from test_pages import HOSTILE_TOKEN, INJECTIONS, Elements, synthetic_tables

from mono import family_pages, pages, splitting, store

SIZES = (4, 7)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two analysed 'trials' (mono.features' tables, hostile corpus text) of 4 and 7
    features, matched by hand-made arrays: size-1 features 0-5 link to 0,1,2,3,0,1 (and 5
    also to 2: a merge), feature 6 to nothing."""
    out = str(tmp_path_factory.mktemp("split_site"))
    trials = []
    for s, n in enumerate(SIZES):
        adir = store.Layout(out).analysis(f"F_{n}_trial")
        synthetic_tables(adir, n)
        trials.append({"name": f"F_{n}_trial", "n_features": n, "analysis": adir,
                       "sae_dir": "x", "l1_coeff": 1e-3, "lr": 1e-3})
    parents = np.array([[i % 4, (i + 1) % 4, (i + 2) % 4] for i in range(7)])
    cos = np.array([[0.9, 0.3, 0.1]] * 7, dtype=np.float32)
    cos[5, 1], cos[6, 0] = 0.75, 0.5
    corr = cos * 0.5
    xy = np.random.default_rng(0).standard_normal((11, 2)).astype(np.float32)
    cols = splitting.assemble(list(SIZES), [parents], [cos], [corr], [np.arange(4)],
                              [np.full(4, 0.9, np.float32)], np.full(11, 0.01), xy, 0.7)
    tokens, tables = splitting.member_tokens(trials)
    fams = splitting.families_json(cols, tokens)
    summary = {"trials": trials, "threshold": 0.7, "candidates": 3, "sample_rows": 100,
               "families": len(fams),
               "sizes": splitting.size_summary(list(SIZES), cols)}
    index = family_pages.write(store.Layout(out).splitting, cols, fams, summary, tables,
                               tokens)
    return {"out": out, "index": index, "cols": cols, "families": fams, "trials": trials}


def test_families_are_the_linked_groups(site):
    members = [sorted(map(tuple, f["members"])) for f in site["families"]]
    # 0,1,2 of size 0 merge through size-1 feature 5 (linked to 1 and 2); 3 stays apart
    assert members == [[(0, 1), (0, 2), (1, 1), (1, 2), (1, 5)],
                       [(0, 0), (1, 0), (1, 4)], [(0, 3), (1, 3)]]
    assert site["cols"]["family"][4 + 6] == -1                        # unlinked
    assert site["cols"]["split_factor"][:4] == [2, 2, 2, 1]


def _hrefs_resolve(path: str, text: str) -> int:
    links = [h for h in re.findall(r'href="([^"#]+)"', text) if "://" not in h]
    for href in links:
        target = os.path.normpath(os.path.join(os.path.dirname(path), href))
        assert os.path.exists(target), (path, href)
    return len(links)


def _inert(text: str) -> None:
    parser = Elements()
    parser.feed(text)
    parser.close()
    assert parser.on_attrs == []
    ours = {js.removeprefix("<script>").removesuffix("</script>")
            for js in (pages._ONERROR, family_pages._MAP_JS)}
    assert all(attrs == {} and body in ours for attrs, body in parser.scripts)
    for raw in INJECTIONS + (HOSTILE_TOKEN, "<!--"):
        assert raw not in text


def test_pages_link_everything_and_keep_corpus_text_escaped(site):
    html_dir = os.path.dirname(site["index"])
    paths = [site["index"], os.path.join(html_dir, "map.html")] + [
        os.path.join(html_dir, "families", f"{f['id']}.html") for f in site["families"]]
    for path in paths:
        text = open(path, encoding="utf-8").read()
        _inert(text)
        assert _hrefs_resolve(path, text) > 0
    index = open(site["index"], encoding="utf-8").read()
    assert pages.esc(HOSTILE_TOKEN) in index                          # a family's top token
    fam0 = open(os.path.join(html_dir, "families", "0.html"), encoding="utf-8").read()
    assert fam0.count('class="card"') == 5 and fam0.count("<mark") > 0
    for s, trial in enumerate(site["trials"]):                        # the feature pages
        page = os.path.join(trial["analysis"], "html", "features", "1.html")
        text = open(page, encoding="utf-8").read()
        assert 'class="split"' in text and _hrefs_resolve(page, text) > 3
        assert "families/0.html" in text
        assert ("children in F=7" in text) == (s == 0) and ("parents in F=4" in text) == (s == 1)
    for name in ("map.png", "matched.png", "split_factors.png"):
        assert open(os.path.join(html_dir, name), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_families_index_and_map_in_a_real_browser(site, tmp_path):
    dom = chromium(tmp_path, "file://" + site["index"], "--dump-dom")
    assert js_errors(dom) == ""
    body = re.search(r'<table id="families">.*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
    assert body.count("<tr") == len(site["families"])
    map_html = os.path.join(os.path.dirname(site["index"]), "map.html")
    dom = chromium(tmp_path, "file://" + map_html, "--dump-dom")
    assert js_errors(dom) == "" and 'data-points="11"' in dom        # the map's script ran
    assert dom.count("<circle") == 11
    for name, url in (("families.png", site["index"]), ("map.png", map_html),
                      ("family.png", os.path.join(os.path.dirname(site["index"]),
                                                  "families", "0.html"))):
        shot = tmp_path / name
        chromium(tmp_path, "file://" + url, f"--screenshot={shot}", "--window-size=1280,900")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
