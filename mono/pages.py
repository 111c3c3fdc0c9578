"""Stage 5: feature tables and sweep results -> static HTML pages (no server, no network).

Two parts, each in its own section below:

Feature browser (`feature_browser`): reads <out>/analysis/<trial>/ (features.parquet,
examples.json, summary.json, written by mono.features) and writes its html/:
    index.html                every feature (id, density, class, max activation, top
                              activating tokens, top logit tokens), sortable, filterable and
                              searchable by inline JS over an embedded JSON block
    features/<id>.html        one page per feature: top activations in context, value-interval
                              samples, activation histogram (inline SVG), logit effects,
                              links to the neighbours and the index
    high_density.html, ultra_low_density.html   the seed's two pages (split at seed_cutoff)
    dead.html                 the features that never fired
Corpus text is untrusted: every piece goes through `html.escape(quote=True)` in HTML, and
the JSON block is escaped so the HTML parser cannot end it (`<`, `>`, `&` as \\u003c ...);
its strings are put into the page with textContent only, never parsed as HTML. Newlines
show as ⏎. Everything is inline (CSS, JS, SVG): the pages work from file:// offline.

Sweep report: see its section.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math

import numpy as np

from mono import store

logger = logging.getLogger(__name__)


# === feature browser ======================================================================

CLASSES = ("dead", "ultralow", "low", "dense")

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1200px;
padding:12px 20px;color:#1d1d1f;background:#fff}
h1{font-size:22px;margin:8px 0}h2{font-size:17px;margin:22px 0 8px}
h3{font-size:15px;margin:14px 0 4px}
a{color:#0b57d0}nav.top{display:flex;gap:16px;margin:6px 0 10px}
.muted{color:#666}.num{text-align:right;font-variant-numeric:tabular-nums}
table{border-collapse:collapse;width:100%}th,td{padding:3px 8px;border-bottom:1px solid #eee;
vertical-align:top;text-align:left}th{background:#f6f6f8;position:sticky;top:0}
th[data-key]{cursor:pointer;user-select:none}th[data-key]:hover{background:#e8eaf0}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
code{background:#f1f3f4;border-radius:3px;padding:0 3px;white-space:pre;font-size:12.5px}
td.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;white-space:pre-wrap;
word-break:break-all}mark{border-radius:2px;padding:0 1px;color:inherit}
.badge{display:inline-block;border-radius:9px;padding:0 8px;font-size:12px;color:#fff}
.badge.dead{background:#8e8e93}.badge.ultralow{background:#af52de}.badge.low{background:#34a853}
.badge.dense{background:#ea4335}
tr.dead td:first-child{border-left:3px solid #8e8e93}
tr.ultralow td:first-child{border-left:3px solid #af52de}
tr.low td:first-child{border-left:3px solid #34a853}
tr.dense td:first-child{border-left:3px solid #ea4335}
.controls{display:flex;flex-wrap:wrap;gap:12px;align-items:center;margin:10px 0}
.controls input[type=search]{width:260px;padding:4px 6px}
.cols{display:flex;gap:28px;flex-wrap:wrap}.cols>div{flex:1;min-width:280px}
#js-errors{color:#b00020;background:#fdecea;padding:6px;white-space:pre-wrap}
.grid{display:flex;flex-wrap:wrap;gap:6px 12px}
"""

# Installed first in every page: uncaught errors become visible text in #js-errors (the
# browser test reads it back through --dump-dom).
_ONERROR = """<script>
window.onerror=function(m,s,l,c){var e=document.getElementById("js-errors");
if(e){e.hidden=false;e.textContent+=m+" ("+l+":"+c+")\\n";}};
window.addEventListener("unhandledrejection",function(ev){window.onerror(String(ev.reason),"",0,0);});
</script>"""

_INDEX_JS = """<script>
(function(){
var rows=JSON.parse(document.getElementById("feature-data").textContent);
var st={key:0,dir:1,cls:"",q:"",page:0,size:5000};
// The view lives in the URL hash (#cls=dense&q=the&sort=1&dir=-1): links and reloads keep it.
var h=new URLSearchParams(location.hash.slice(1));
if(h.has("cls"))st.cls=h.get("cls");if(h.has("q"))st.q=h.get("q").toLowerCase();
if(h.has("sort"))st.key=+h.get("sort")||0;if(h.has("dir"))st.dir=+h.get("dir")<0?-1:1;
if(h.has("page"))st.page=+h.get("page")||0;
var tbody=document.querySelector("#features tbody");
var heads=document.querySelectorAll("#features th[data-key]");
function text(list){return list.join(" ").toLowerCase();}
function keep(r){
  if(st.cls&&r[2]!==st.cls)return false;
  if(!st.q)return true;
  return String(r[0])===st.q||text(r[6]).indexOf(st.q)>=0||text(r[7]).indexOf(st.q)>=0;
}
function cmp(a,b){
  var x=a[st.key],y=b[st.key];
  if(Array.isArray(x)){x=text(x);y=text(y);}
  return (x<y?-1:x>y?1:0)*st.dir||a[0]-b[0];
}
function cell(tr,value,cls){var td=document.createElement("td");if(cls)td.className=cls;
  td.textContent=value;tr.appendChild(td);return td;}
function tokens(tr,list){var td=document.createElement("td");
  list.forEach(function(t){var c=document.createElement("code");
  c.textContent=t.replace(/\\n/g,"\\u23ce");
  td.appendChild(c);td.appendChild(document.createTextNode(" "));});tr.appendChild(td);}
function render(){
  var view=rows.filter(keep).sort(cmp);
  var pages=Math.max(1,Math.ceil(view.length/st.size));
  st.page=Math.min(st.page,pages-1);
  var part=view.slice(st.page*st.size,(st.page+1)*st.size);
  var frag=document.createDocumentFragment();
  part.forEach(function(r){
    var tr=document.createElement("tr");tr.className=r[2];
    var td=document.createElement("td"),a=document.createElement("a");
    a.href="features/"+r[0]+".html";a.textContent=r[0];td.appendChild(a);tr.appendChild(td);
    cell(tr,r[1]>0?r[1].toExponential(2):"0","num");
    var b=document.createElement("span");b.className="badge "+r[2];b.textContent=r[2];
    cell(tr,"").appendChild(b);
    cell(tr,r[3].toFixed(3),"num");cell(tr,r[4],"num");cell(tr,r[5].toFixed(3),"num");
    tokens(tr,r[6]);tokens(tr,r[7]);frag.appendChild(tr);
  });
  tbody.replaceChildren(frag);
  document.getElementById("shown").textContent=view.length+" of "+rows.length+
    " features; page "+(st.page+1)+" of "+pages;
  document.body.setAttribute("data-rendered",String(part.length));
  document.getElementById("search").value=st.q;document.getElementById("cls").value=st.cls;
  var hash=new URLSearchParams({cls:st.cls,q:st.q,sort:st.key,dir:st.dir,page:st.page});
  history.replaceState(null,"","#"+hash.toString());
  heads.forEach(function(h){h.classList.remove("asc","desc");
    if(+h.dataset.key===st.key)h.classList.add(st.dir>0?"asc":"desc");});
}
heads.forEach(function(h){h.addEventListener("click",function(){
  var k=+h.dataset.key;st.dir=(k===st.key)?-st.dir:(k===0||k===2?1:-1);
  st.key=k;st.page=0;render();});});
document.getElementById("search").addEventListener("input",function(e){
  st.q=e.target.value.trim().toLowerCase();st.page=0;render();});
document.getElementById("cls").addEventListener("change",function(e){
  st.cls=e.target.value;st.page=0;render();});
document.getElementById("size").addEventListener("change",function(e){
  st.size=+e.target.value;st.page=0;render();});
document.getElementById("prev").addEventListener("click",function(){if(st.page>0){st.page--;render();}});
document.getElementById("next").addEventListener("click",function(){st.page++;render();});
render();
})();
</script>"""


def esc(value) -> str:
    """Untrusted text -> HTML text or attribute value: html.escape(quote=True), newlines as ⏎."""
    text = html.escape(str(value), quote=True)
    return text.replace("\r\n", "\u23ce").replace("\n", "\u23ce").replace("\r", "\u23ce")


def json_script(obj, element_id: str) -> str:
    """obj as a <script type="application/json"> block the HTML parser cannot leave: <, >
    and & (so `</script>`, `<!--`, `]]>`) and the JS line separators become \\uXXXX escapes,
    which JSON.parse turns back into the same characters."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, code in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                       ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, code)
    return f'<script type="application/json" id="{esc(element_id)}">{text}</script>'


def _page(title: str, body: str, scripts: str = "") -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(title)}</title><style>{_CSS}</style>{_ONERROR}</head>\n<body>'
            f'<pre id="js-errors" hidden></pre>\n{body}\n{scripts}</body></html>\n')


def _bars_svg(counts: list[int], labels: tuple[str, str], title: str, width: int = 560,
              height: int = 140, bar_titles: list[str] | None = None) -> str:
    """A bar chart as inline SVG (numbers only, no corpus text)."""
    n, top = max(1, len(counts)), max(max(counts, default=0), 1)
    w, h = (width - 40) / n, height - 30
    bars = []
    for i, c in enumerate(counts):
        bh = h * c / top
        tip = esc(bar_titles[i]) if bar_titles else str(c)
        bars.append(f'<rect x="{30 + i * w:.1f}" y="{10 + h - bh:.1f}" width="{max(w - 1, 1):.1f}"'
                    f' height="{bh:.1f}" fill="#4c7bd9"><title>{tip}</title></rect>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="{esc(title)}"><text x="30" y="9" font-size="10" '
            f'fill="#666">{esc(title)} (tallest bar {top})</text>{"".join(bars)}'
            f'<line x1="30" y1="{10 + h}" x2="{width - 10}" y2="{10 + h}" stroke="#999"/>'
            f'<text x="30" y="{height - 8}" font-size="11">{esc(labels[0])}</text>'
            f'<text x="{width - 10}" y="{height - 8}" font-size="11" text-anchor="end">'
            f'{esc(labels[1])}</text></svg>')


def _example_rows(examples: list[dict], max_act: float) -> str:
    rows = []
    for ex in examples:
        alpha = 0.15 + 0.75 * min(1.0, ex["act"] / max_act) if max_act > 0 else 0.5
        rows.append(f'<tr><td class="num">{float(ex["act"]):.3f}</td><td class="ctx" '
                    f'title="ctx {int(ex["ctx"])} pos {int(ex["pos"])}">{esc(ex["left"])}'
                    f'<mark style="background:rgba(255,140,0,{alpha:.2f})">{esc(ex["token"])}'
                    f'</mark>{esc(ex["right"])}</td></tr>')
    return ('<table><thead><tr><th class="num">activation</th><th>context (activating token '
            'highlighted)</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def read_tables(analysis_dir: str) -> tuple[list[dict], dict, dict]:
    """(features.parquet rows, examples.json, summary.json or {}) of an analysis dir."""
    rows = store.read_table(store.join(analysis_dir, "features.parquet")).to_pylist()
    examples = store.read_json(store.join(analysis_dir, "examples.json"))
    path = store.join(analysis_dir, "summary.json")
    return rows, examples, store.read_json(path) if store.exists(path) else {}


def top_tokens(examples: list[dict], n: int = 3) -> list[str]:
    """The most frequent activating tokens among a feature's top examples."""
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex["token"]] = counts.get(ex["token"], 0) + 1
    return [t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:n]]


def feature_browser(analysis_dir: str, summary: dict | None = None, extra=None,
                    tables: tuple | None = None) -> str:
    """Write <analysis_dir>/html/ from the tables (module doc); -> the index.html path.
    extra: feature id -> HTML put under each feature page's heading (mono.family_pages
    links the feature's parent and children in other dictionary sizes). tables: what
    `read_tables(analysis_dir)` returns, when the caller has read it already."""
    rows, examples, saved = tables if tables is not None else read_tables(analysis_dir)
    summary = summary or saved
    out = store.join(analysis_dir, "html")
    feats = examples["features"]
    store.write_bytes_atomic(store.join(out, "index.html"),
                             index_page(rows, feats, summary).encode())
    for row in rows:
        store.write_bytes_atomic(store.join(out, "features", f"{row['feature']}.html"),
                                 feature_page(row, feats[row["feature"]], len(rows),
                                              examples, extra(row["feature"]) if extra
                                              else "").encode())
    cutoff = float((summary.get("analysis") or {}).get("seed_cutoff", 1e-3))
    for name, page in seed_pages(rows, feats, cutoff, examples["rows"]).items():
        store.write_bytes_atomic(store.join(out, name), page.encode())
    store.write_bytes_atomic(store.join(out, "dead.html"),
                             dead_page(rows, examples["rows"]).encode())
    logger.info("feature browser: %d feature pages under %s", len(rows), out)
    return store.join(out, "index.html")


def _density_svg(rows: list[dict]) -> str:
    """Histogram of log10 density over the alive features (the seed's/paper's plot)."""
    lo, hi, per = -8.0, 0.0, 4   # bins of 0.25 decades
    counts = [0] * int((hi - lo) * per)
    for r in rows:
        if r["density"] > 0:
            b = int((math.log10(r["density"]) - lo) * per)
            counts[min(max(b, 0), len(counts) - 1)] += 1
    tips = [f"10^{lo + i / per:.2f}..10^{lo + (i + 1) / per:.2f}: {c}"
            for i, c in enumerate(counts)]
    return _bars_svg(counts, ("10^-8", "1"), "features by log10 density (alive only)",
                     width=720, bar_titles=tips)


def index_page(rows: list[dict], feats: list[dict], summary: dict) -> str:
    data = [[r["feature"], r["density"], r["density_class"], r["max_act"], r["count"],
             r["mean_act"], top_tokens(feats[r["feature"]]["top"]), r["logit_top"][:3]]
            for r in rows]
    classes = {c: sum(r["density_class"] == c for r in rows) for c in CLASSES}
    n_rows = summary.get("rows", 0)
    head = (f'<h1>Feature browser: {esc(summary.get("trial", ""))}</h1>'
            f'<p class="muted">{len(rows)} features of the SAE in '
            f'<code>{esc(summary.get("sae_dir", ""))}</code> over {n_rows:,} activation rows '
            f'(densities resolve 1/{max(n_rows, 1):,}); L0 {summary.get("l0", 0):.2f}. '
            + ", ".join(f'<span class="badge {c}">{c}</span> {classes[c]}' for c in CLASSES)
            + '</p><nav class="top"><a href="high_density.html">high density</a>'
              '<a href="ultra_low_density.html">ultra-low density</a>'
              '<a href="dead.html">dead features</a></nav>')
    controls = ('<div class="controls"><input type="search" id="search" '
                'placeholder="search id or token" aria-label="search">'
                '<label>class <select id="cls"><option value="">all</option>'
                + "".join(f'<option value="{c}">{c}</option>' for c in CLASSES)
                + '</select></label><label>per page <select id="size"><option>100</option>'
                  '<option>1000</option><option selected>5000</option></select></label>'
                  '<button id="prev">&larr;</button><button id="next">&rarr;</button>'
                  '<span id="shown" class="muted"></span></div>')
    names = ["feature", "density", "class", "max act", "count", "mean act",
             "top activating tokens", "top logit tokens"]
    table = ('<table id="features"><thead><tr>'
             + "".join(f'<th data-key="{i}"{" class=num" if i in (1, 3, 4, 5) else ""}>'
                       f'{n}</th>' for i, n in enumerate(names))
             + '</tr></thead><tbody></tbody></table>'
               '<noscript>The table needs JavaScript; every feature page is under '
               'features/&lt;id&gt;.html.</noscript>')
    body = head + _density_svg(rows) + controls + table + json_script(data, "feature-data")
    return _page(f"Features: {summary.get('trial', '')}", body, _INDEX_JS)


def _logit_table(tokens: list[str], values: list[float], sign: str) -> str:
    rows = "".join(f'<tr><td><code>{esc(t)}</code></td><td class="num">{v:+.3f}</td></tr>'
                   for t, v in zip(tokens, values))
    return f'<table><thead><tr><th>token</th><th class="num">{sign}logit</th></tr></thead>' \
           f'<tbody>{rows}</tbody></table>'


def feature_page(row: dict, feat: dict, n_features: int, meta: dict, extra: str = "") -> str:
    i, cls, max_act = row["feature"], row["density_class"], row["max_act"]
    nav = ('<nav class="top">'
           + (f'<a href="{i - 1}.html" rel="prev">&larr; {i - 1}</a>' if i > 0 else "")
           + '<a href="../index.html">index</a>'
           + (f'<a href="{i + 1}.html" rel="next">{i + 1} &rarr;</a>' if i + 1 < n_features
              else "") + "</nav>")
    head = (f'<h1>Feature {i} <span class="badge {esc(cls)}">{esc(cls)}</span></h1>'
            f'<p>density {row["density"]:.3g} ({row["count"]:,} of {meta["rows"]:,} rows), '
            f'max activation {max_act:.4g}, mean when active {row["mean_act"]:.4g}</p>'
            + extra)
    logit = meta.get("logit") or {}
    left_out = (f'; {logit["excluded"]:,} of the {logit["vocab"]:,} tokens, those occurring '
                f'fewer than {logit["min_count"]:,} times in the training tokens, left out'
                if logit else "")
    logits = ('<h2>Logit effects</h2><p class="muted">decoder direction through c_proj, '
              'ln_f (its Jacobian averaged over training positions) and the unembedding; '
              f'relative to the median of the tokens ranked{esc(left_out)}</p>'
              '<div class="cols"><div>' + _logit_table(row["logit_top"],
                                                      row["logit_top_values"], "+")
              + '</div><div>' + _logit_table(row["logit_bottom"], row["logit_bottom_values"],
                                             "&minus;") + "</div></div>")
    if row["count"] == 0:
        body = (f'<p>Dead: never active over the {meta["rows"]:,} rows scanned.</p>')
        return _page(f"Feature {i}", nav + head + body + logits)
    hist = _bars_svg(row["hist"], ("0", f"{max_act:.3g}"), "activation histogram",
                     bar_titles=[f"({max_act * b / len(row['hist']):.3g}, "
                                 f"{max_act * (b + 1) / len(row['hist']):.3g}]: {c}"
                                 for b, c in enumerate(row["hist"])])
    top = f'<h2>Top {len(feat["top"])} activations</h2>' + _example_rows(feat["top"], max_act)
    n_int = len(feat["intervals"])
    parts = [f'<h2>Samples from {n_int} activation intervals</h2><p class="muted">evenly '
             f'spaced in value between 0 and the max (paper); uniform samples of each</p>']
    for j in range(n_int - 1, -1, -1):
        count = row["interval_counts"][j]
        lo, hi = max_act * j / n_int, max_act * (j + 1) / n_int
        close = "]" if j == n_int - 1 else ")"
        parts.append(f'<h3>Interval {j + 1}: [{lo:.3g}, {hi:.3g}{close} &middot; {count:,} '
                     f'activations</h3>')
        if feat["intervals"][j]:
            parts.append(_example_rows(feat["intervals"][j], max_act))
    return _page(f"Feature {i}", nav + head + hist + logits + top + "".join(parts))


def seed_pages(rows: list[dict], feats: list[dict], cutoff: float, n_rows: int) -> dict:
    """The seed's high_density / ultra_low_density pages: alive features above / at or
    below `cutoff`, each with its top examples, ordered by max activation (as the seed's
    sorted_ variants)."""
    pages = {}
    for name, title, keep in (
            ("high_density.html", f"High-density features (density > {cutoff:g})",
             lambda d: d > cutoff),
            ("ultra_low_density.html", f"Ultra-low-density features (0 < density <= {cutoff:g})",
             lambda d: 0 < d <= cutoff)):
        chosen = sorted((r for r in rows if keep(r["density"])), key=lambda r: -r["max_act"])
        blocks = [f'<h3><a href="features/{r["feature"]}.html">Feature {r["feature"]}</a> '
                  f'<span class="muted">density {r["density"]:.3g}, max {r["max_act"]:.4g}'
                  f'</span></h3>' + _example_rows(feats[r["feature"]]["top"], r["max_act"])
                  for r in chosen]
        body = (f'<nav class="top"><a href="index.html">index</a></nav><h1>{esc(title)}</h1>'
                f'<p class="muted">{len(chosen)} features over {n_rows:,} rows, by max '
                f'activation</p>' + "".join(blocks))
        pages[name] = _page(title, body)
    return pages


def dead_page(rows: list[dict], n_rows: int) -> str:
    dead = [r["feature"] for r in rows if r["count"] == 0]
    links = "".join(f'<a href="features/{i}.html">{i}</a>' for i in dead)
    body = (f'<nav class="top"><a href="index.html">index</a></nav><h1>Dead features</h1>'
            f'<p>{len(dead)} of {len(rows)} features never fired over the {n_rows:,} rows '
            f'scanned.</p><div class="grid">{links}</div>')
    return _page("Dead features", body)


# === sweep report =========================================================================
# <experiment>/report/ from <experiment>/trials.json (mono.sweep.index_trials) and each
# finished trial's density.npy: index.html (a table of every trial, the L0 vs
# loss-recovered scatter with its Pareto front, the trials' log10-density histograms
# overlaid) + pareto.png + density.png. Self-contained: inline CSS, relative image links,
# every value HTML-escaped; works from file:// offline. Local paths and URIs alike.

HEADLINE = "loss_recovered_mean"
"""The sweep's headline metric (mono.metrics docstring): loss recovered against mean ablation.
The report, its Pareto front and the analysis's default trial (mono.features) use it."""
SWEEP_COLUMNS = (  # (key, header, format); key in the entry, else in its metrics
    ("l1_coeff", "l1 coeff", "{:.3g}"), ("lr", "lr", "{:.3g}"),
    ("n_features", "features", "{:,}"), ("step", "steps", "{:,}"),
    ("l0", "L0", "{:.2f}"),
    (HEADLINE, "loss recovered vs mean ablation", "{:.3f}"),
    ("loss_recovered", "vs zero ablation (paper)", "{:.3f}"),
    ("ce_increase", "CE increase (nats)", "{:.4f}"), ("kl", "KL (nats/token)", "{:.4f}"),
    ("explained_variance", "explained var", "{:.3f}"), ("mse", "MSE", "{:.4g}"),
    # counted over the trailing window of training rows (resolution 1 / rows); the eval
    # tokens resolve densities only down to 1 / eval tokens (mono.metrics docstring)
    ("dead", "dead", "{:,}"), ("ultralow", "ultralow", "{:,}"), ("dense", "dense", "{:,}"),
    ("window_rows", "over training rows", "{:,}"),
    ("dead_eval", "dead (eval tokens)", "{:,}"),
)

_SWEEP_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1300px;
padding:1em 2em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{padding:.25em .7em;border-bottom:1px solid #ddd;
text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}tr.pareto td{background:#fff6d5}
tr.bad td{color:#a00}code{font-size:90%}img{max-width:100%;border:1px solid #eee}
.note{color:#666}
"""


def _value(trial: dict, key: str):
    if key in trial:
        return trial[key]
    return (trial.get("metrics") or trial.get("last_report") or {}).get(key)


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return spec.format(value)


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (l0, loss recovered) points: True where no other point has L0 <= and loss
    recovered >= with one of them strict (lower L0 and higher loss recovered are better)."""
    return [not any(l0b <= l0a and rb >= ra and (l0b, rb) != (l0a, ra) for l0b, rb in points)
            for l0a, ra in points]


def _trial_label(t: dict) -> str:
    """A trial's grid point for plot labels: l1, lr and (when sizes are an axis) F."""
    size = f"F {t['n_features']}, " if t.get("n_features") else ""
    return f"{size}l1 {t['l1_coeff']:.2g}, lr {t['lr']:.2g}"


def _scatter_png(done: list[dict], front: list[bool]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)  # Agg without pyplot: no global state, no display
    ax = fig.add_subplot()
    l0 = np.array([_value(t, "l0") for t in done], dtype=float)
    rec = np.array([_value(t, HEADLINE) for t in done], dtype=float)
    on = np.array(front, dtype=bool)
    ax.scatter(l0[~on], rec[~on], color="tab:blue", label="trial")
    order = np.argsort(l0[on])
    ax.plot(l0[on][order], rec[on][order], "o-", color="tab:red", label="Pareto front")
    for t, x, y in zip(done, l0, rec):
        ax.annotate(_trial_label(t), (x, y), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    if len(l0) and l0.min() > 0 and l0.max() / l0.min() > 20:
        ax.set_xscale("log")
    ax.set_xlabel("L0 (mean active features per token)")
    ax.set_ylabel("loss recovered vs mean ablation")
    ax.set_title("L0 vs loss recovered against mean ablation (up and left is better)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _density_png(curves: list[tuple[str, np.ndarray]]) -> bytes:
    """Overlaid histograms of log10 density over the features that fired, one per trial."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    alive = [np.log10(d[d > 0]) for _, d in curves]
    low = min((a.min() for a in alive if len(a)), default=-6.0)
    bins = np.linspace(math.floor(low * 4) / 4, 0, 41)
    for (label, d), a in zip(curves, alive):
        ax.hist(a, bins=bins, histtype="step", linewidth=1.4,
                label=f"{label} ({int((d == 0).sum())} dead)")
    for x in (-5, -2):  # ultralow (< 1e-5, our default cutoff) and dense (> 1e-2, paper)
        ax.axvline(x, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("log10 feature density (trailing training rows with f > 0; dead not shown)")
    ax.set_ylabel("features")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _trial_rows(trials: list[dict], front: dict[str, bool], experiment: str) -> str:
    rows = []
    for t in trials:
        cls = "pareto" if front.get(t["name"]) else ("bad" if t["status"] != "done" else "")
        cells = "".join(f"<td>{html.escape(_fmt(_value(t, key), spec))}</td>"
                        for key, _, spec in SWEEP_COLUMNS)
        name, sae = html.escape(t["name"]), t.get("sae_dir")
        if sae and not store.is_uri(sae) and sae.startswith(experiment):  # relative: file://
            href = html.escape("../" + sae[len(experiment):].strip("/") + "/")
            name = f'<a href="{href}" title="{html.escape(sae)}">{name}</a>'
        elif sae:
            name = f'<span title="{html.escape(sae)}">{name}</span>'
        status = t["status"] + (f": {t['error']}" if t.get("error") else "")
        rows.append(f'<tr class="{cls}"><td class="l">{name}</td>'
                    f'<td class="l">{html.escape(status)}</td>{cells}'
                    f'<td>{"&#9733;" if front.get(t["name"]) else ""}</td></tr>')
    return "".join(rows)


def write_sweep_report(experiment: str) -> str:
    """Write <experiment>/report/ (index.html, pareto.png, density.png) from trials.json;
    returns the path of index.html."""
    index = store.read_json(store.join(experiment, "trials.json"))
    trials = index["trials"]
    out = store.join(experiment, "report")
    done = [t for t in trials if t["status"] == "done"
            and all(_value(t, k) is not None for k in ("l0", HEADLINE))]
    flags = pareto_front([(_value(t, "l0"), _value(t, HEADLINE)) for t in done])
    front = {t["name"]: f for t, f in zip(done, flags)}
    figures = ""
    if done:
        store.write_bytes_atomic(store.join(out, "pareto.png"), _scatter_png(done, flags))
        curves = []
        for t in done:
            path = store.join(t["dir"], "density.npy")
            if store.exists(path):
                curves.append((_trial_label(t),
                               np.load(io.BytesIO(store.read_bytes(path)))))
        store.write_bytes_atomic(store.join(out, "density.png"), _density_png(curves))
        figures = ('<h2>L0 vs loss recovered against mean ablation</h2><img src="pareto.png" '
                   'alt="L0 vs loss recovered scatter, Pareto front in red">'
                   '<h2>Feature density over the training rows</h2><img src="density.png" '
                   'alt="log10 feature density histograms, one per trial">')
    counts = {s: sum(t["status"] == s for t in trials) for s in ("done", "error", "unfinished")}
    heads = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in SWEEP_COLUMNS)
    body = (
        f"<h1>Sweep report: {html.escape(experiment.rstrip('/').rsplit('/', 1)[-1])}</h1>"
        f'<p class="note">Experiment <code>{html.escape(experiment)}</code>: {len(trials)} '
        f"trials, {counts['done']} done, {counts['error']} errored, {counts['unfinished']} "
        f"unfinished. Final eval metrics of each trial (the last report for those not done); "
        f"&#9733; = on the Pareto front of L0 (lower is better) vs loss recovered against "
        f"mean ablation (higher is better). Losses are next-token cross-entropies on the "
        f"eval tokens with the MLP activation as is (L_orig), replaced by its mean over "
        f"training rows (L_mean), zeroed (L_zero) or replaced by the SAE's reconstruction "
        f"(L_sae). Headline: loss recovered vs mean ablation = (L_mean - L_sae) / (L_mean - "
        f"L_orig). Vs zero ablation = (L_zero - L_sae) / (L_zero - L_orig), the paper's "
        f"definition (79% at A/1): this LM's MLP output has a large input-independent part "
        f"that b_dec alone reproduces, so it flatters every trial. CE increase = L_sae - "
        f"L_orig; KL = mean KL(original || spliced) next-token distribution per token. Dead "
        f"/ ultralow (density below the SAE's ultralow_density, 1e-5 by default: our cutoff; "
        f"the paper's A/1 ultralow cluster sits below 1e-6) / dense (above 1e-2): counted "
        f"over the trailing window of training rows shown (resolution 1 / rows); dead (eval "
        f"tokens) resolves only 1 / eval tokens.</p>"
        f'<table><tr><th class="l">trial (link: its sae/ export)</th><th class="l">status</th>'
        f'{heads}<th>Pareto</th></tr>{_trial_rows(trials, front, experiment)}</table>'
        f"{figures}")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Sweep report'
            f"</title><style>{_SWEEP_CSS}</style></head><body>{body}</body></html>")
    path = store.join(out, "index.html")
    store.write_bytes_atomic(path, page.encode())
    logger.info("sweep report: %s", path)
    return path
