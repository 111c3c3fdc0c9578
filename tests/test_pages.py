"""Stage 5: the feature browser (mono.pages) from synthetic feature tables.

The tables hold hostile corpus text (script tags, attribute breakouts, `</textarea>`,
`<!--`, a `</script>` inside a token) and multi-line text: every page must show it as text,
and the only scripts and event handlers on a page must be the browser's own.
"""

import html.parser
import json
import os

import pyarrow as pa

from mono import pages, store

INJECTIONS = ("<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "</textarea>")
HOSTILE_TOKEN = "</script><!--<script>alert(2)</script>"
N_FEATURES = 7


def synthetic_tables(adir: str, n: int = N_FEATURES, rows: int = 10_000) -> dict:
    """features.parquet + examples.json + summary.json as mono.features writes them (n <= 7):
    feature 0 dead, 1 ultralow, 2-3 low, the rest dense."""
    counts = [0, 1, 5, 50, 500, 900, 2000]
    classes = ["dead", "ultralow", "low", "low", "dense", "dense", "dense"]
    table, feats = [], []
    for i, (c, cls) in enumerate(zip(counts[:n], classes)):
        d = c / rows
        max_act = 0.0 if c == 0 else 1.0 + i
        top = [] if c == 0 else [
            {"act": max_act * (1 - k / 10), "ctx": 100 + k, "pos": 7,
             "left": f"line one\nline two {INJECTIONS[k % 3]} ",
             "token": HOSTILE_TOKEN if k == 0 else "世界" if k == 1 else f" tok{k}",
             "right": f' {INJECTIONS[(k + 1) % 3]} "quoted" & done'}
            for k in range(min(c, 5))]
        intervals = [[] for _ in range(4)]
        if c:
            intervals[3] = top[:2]
            intervals[0] = [{"act": max_act / 10, "ctx": 5, "pos": 1, "left": "<!-- ",
                             "token": "low", "right": " -->"}]
        table.append({
            "feature": i, "count": c, "density": d, "density_class": cls,
            "max_act": max_act, "mean_act": max_act / 2,
            "hist": [0] * 8 if c == 0 else [c - 3, 1, 1, 0, 0, 0, 0, 1],
            "interval_counts": [0] * 4 if c == 0 else [c - 3, 1, 0, 2],
            "logit_top_ids": list(range(10)),
            "logit_top": [HOSTILE_TOKEN, '"><img src=x onerror=alert(1)>'] + [f"t{j}" for j in
                                                                             range(8)],
            "logit_top_values": [1.0 - j / 10 for j in range(10)],
            "logit_bottom_ids": list(range(10)),
            "logit_bottom": ["</textarea>", "\n"] + [f"b{j}" for j in range(8)],
            "logit_bottom_values": [-1.0 + j / 10 for j in range(10)],
        })
        feats.append({"top": top, "intervals": intervals})
    store.write_table_atomic(store.join(adir, "features.parquet"), pa.Table.from_pylist(table))
    store.write_json(store.join(adir, "examples.json"),
                     {"rows": rows, "window": 4, "n_intervals": 4, "features": feats})
    summary = {"trial": 'trial<script>alert("t")</script>', "sae_dir": "/x/</textarea>/sae",
               "rows": rows, "l0": 3.5, "analysis": {"seed_cutoff": 1e-2}}
    store.write_json(store.join(adir, "summary.json"), summary)
    return summary


class Elements(html.parser.HTMLParser):
    """Collects every <script> (attributes, text), on* attributes, links and <mark>s."""

    def __init__(self):
        super().__init__()
        self.scripts, self.on_attrs, self.links, self.marks = [], [], [], []
        self._in = None

    def handle_starttag(self, tag, attrs):
        self.on_attrs += [(tag, k) for k, _ in attrs if k.lower().startswith("on")]
        if tag == "a":
            self.links.append(dict(attrs).get("href"))
        if tag in ("script", "mark"):
            self._in = tag
            (self.scripts if tag == "script" else self.marks).append([dict(attrs), ""])

    def handle_data(self, data):
        if self._in:
            (self.scripts if self._in == "script" else self.marks)[-1][1] += data

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None


def check_page_is_inert(text: str) -> Elements:
    """Parse a page: no on* attribute anywhere, every <script> one of ours, no raw injection."""
    parser = Elements()
    parser.feed(text)
    parser.close()
    assert parser.on_attrs == []
    ours = {pages._ONERROR.removeprefix("<script>").removesuffix("</script>"),
            pages._INDEX_JS.removeprefix("<script>").removesuffix("</script>")}
    for attrs, body in parser.scripts:
        if attrs.get("type") == "application/json":
            assert attrs == {"type": "application/json", "id": "feature-data"}
            json.loads(body)
            assert "<" not in body and ">" not in body
        else:
            assert attrs == {} and body in ours
    for raw in INJECTIONS + (HOSTILE_TOKEN, "<!--"):
        assert raw not in text
    return parser


def all_pages(html_dir: str) -> dict[str, str]:
    found = {}
    for root, _, names in os.walk(html_dir):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, html_dir)] = open(path, encoding="utf-8").read()
    return found


def test_every_page_is_inert_and_the_text_survives(tmp_path):
    adir = str(tmp_path / "analysis" / "t")
    synthetic_tables(adir)
    index = pages.feature_browser(adir)
    assert index == store.join(adir, "html", "index.html")
    found = all_pages(store.join(adir, "html"))
    assert set(found) == {"index.html", "high_density.html", "ultra_low_density.html",
                          "dead.html"} | {f"features/{i}.html" for i in range(N_FEATURES)}
    for name, text in found.items():
        check_page_is_inert(text)
    page = found["features/3.html"]
    assert pages.esc(INJECTIONS[1]) in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "line one\u23celine two" in page                               # newlines as ⏎
    marks = check_page_is_inert(page).marks
    assert [m[1] for m in marks[:2]] == [HOSTILE_TOKEN, "世界"]           # exact text back


def test_index_embeds_every_feature_as_lossless_json(tmp_path):
    adir = str(tmp_path / "a")
    summary = synthetic_tables(adir)
    text = open(pages.feature_browser(adir), encoding="utf-8").read()
    parser = check_page_is_inert(text)
    data = json.loads(next(b for a, b in parser.scripts if a.get("type")))
    assert [r[0] for r in data] == list(range(N_FEATURES))
    assert [r[2] for r in data] == ["dead", "ultralow", "low", "low", "dense", "dense", "dense"]
    assert data[4][7][0] == HOSTILE_TOKEN                                 # round trip exact
    assert HOSTILE_TOKEN in data[4][6] and "世界" in data[4][6]           # top activating
    assert pages.esc(summary["trial"]) in text and summary["trial"] not in text
    for cls in pages.CLASSES:                                             # filter options
        assert f'<option value="{cls}">' in text
    assert text.count("<th data-key=") == 8


def test_json_script_cannot_be_closed_early():
    block = pages.json_script({"s": "</script><!-- & \u2028 '\"", "n": [1, 2.5]}, "x")
    body = block.removeprefix('<script type="application/json" id="x">')
    body = body.removesuffix("</script>")
    assert "<" not in body and ">" not in body and "&" not in body and "\u2028" not in body
    assert json.loads(body) == {"s": "</script><!-- & \u2028 '\"", "n": [1, 2.5]}
    assert pages.esc('a"b\'c<d>&\ne') == "a&quot;b&#x27;c&lt;d&gt;&amp;\u23cee"


def test_feature_pages_link_neighbours_and_show_the_sections(tmp_path):
    adir = str(tmp_path / "a")
    synthetic_tables(adir)
    pages.feature_browser(adir)
    found = all_pages(store.join(adir, "html"))
    first, middle, last = (check_page_is_inert(found[f"features/{i}.html"]) for i in
                           (0, 3, N_FEATURES - 1))
    assert first.links == ["../index.html", "1.html"]
    assert middle.links == ["2.html", "../index.html", "4.html"]
    assert last.links == [f"{N_FEATURES - 2}.html", "../index.html"]
    dead = found["features/0.html"]
    assert "Dead: never active over the 10,000 rows" in dead and "<svg" not in dead
    page = found["features/3.html"]
    assert "<svg" in page and "activation histogram" in page and "Logit effects" in page
    assert page.count("<h3>Interval ") == 4 and "Interval 4: [3, 4]" in page
    assert "&middot; 47 activations" in page                              # interval counts
    assert 'rgba(255,140,0,0.90)' in page                                 # the top example
    assert page.index("Top 5 activations") < page.index("Interval 4")


def test_seed_pages_split_alive_features_at_the_cutoff(tmp_path):
    adir = str(tmp_path / "a")
    synthetic_tables(adir)     # seed_cutoff 1e-2: 500, 900, 2000 of 10,000 rows are above
    pages.feature_browser(adir)
    found = all_pages(store.join(adir, "html"))
    high = check_page_is_inert(found["high_density.html"]).links
    low = check_page_is_inert(found["ultra_low_density.html"]).links
    assert high == ["index.html", "features/6.html", "features/5.html", "features/4.html"]
    assert low == ["index.html", "features/3.html", "features/2.html", "features/1.html"]
    dead = check_page_is_inert(found["dead.html"])
    assert dead.links == ["index.html", "features/0.html"]
    assert "1 of 7 features never fired" in found["dead.html"]
