"""Feature splitting -> static HTML: the families index, one page per family, the map.

Reads what mono.splitting computed (the matches.parquet columns, families.json, its summary)
and each matched trial's analysis tables (<out>/analysis/<trial>/: features.parquet,
examples.json). Writes <out>/splitting/html/:

    index.html            per size: features, the fraction with a close match one size
                          down, the split factors; the figures; every family (its sizes,
                          features per size, top tokens), linking to its page
    families/<id>.html    a family's features side by side, one column per dictionary
                          size: density, top activations in context, the decoder cosine and
                          activation correlation of each link, links to the feature pages
    map.html + map.png    every decoder direction of every size in 2-D (UMAP or PCA, as
                          splitting.map_method): a static PNG, and an inline SVG whose
                          points show id, size and top tokens on hover and open the
                          feature's page on click
    matched.png, split_factors.png   the summary figures

and rewrites each analysed trial's feature pages (pages.feature_browser's `extra` hook)
with the feature's family, its parent candidates in the next smaller size and its children
in the next larger one, each linked. Links are relative (../../analysis/<trial>/html/...),
so the pages work from file:// and from a bucket alike. Corpus text is untrusted: it goes
through pages.esc only; no script reads it (the only scripts are the error hook and the
map's hover box, which reads the escaped <title> of the point).
"""

from __future__ import annotations

import io
import logging

import numpy as np

from mono import pages, store
from mono.pages import esc

logger = logging.getLogger(__name__)

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f")
"""One colour per dictionary size, smallest first (matplotlib's tab10)."""

_CSS = """
.fam{display:flex;gap:14px;align-items:flex-start;overflow-x:auto}
.fam>section{flex:1;min-width:300px;border-left:4px solid #ccc;padding-left:8px}
.card{border:1px solid #e3e3e8;border-radius:6px;padding:6px 8px;margin:0 0 10px}
.card h3{margin:2px 0}.links{font-size:12.5px;color:#444}
svg.map circle{stroke:#fff;stroke-width:.4}svg.map a:hover circle{stroke:#000;stroke-width:1.5}
#hover{position:fixed;pointer-events:none;background:#fff;border:1px solid #999;padding:3px 6px;
font-size:12px;white-space:pre;display:none}
"""

_MAP_JS = """<script>
(function(){
var box=document.getElementById("hover"),svg=document.querySelector("svg.map");
var n=svg.querySelectorAll("circle").length;document.body.setAttribute("data-points",String(n));
svg.addEventListener("mousemove",function(ev){var a=ev.target.closest("a");
  if(!a){box.style.display="none";return;}
  box.textContent=a.querySelector("title").textContent;box.style.display="block";
  box.style.left=(ev.clientX+12)+"px";box.style.top=(ev.clientY+12)+"px";});
svg.addEventListener("mouseleave",function(){box.style.display="none";});
})();
</script>"""


def _page(title: str, body: str, scripts: str = "") -> str:
    return pages._page(title, f"<style>{_CSS}</style>" + body, scripts)


def _feature_href(trials: list[dict], tables: dict, size: int, feature: int,
                  up: str) -> str | None:
    """Relative link from a page `up` levels below <out> to a feature's page (None when
    its trial has no analysis)."""
    if size not in tables:
        return None
    name = trials[size]["analysis"].rstrip("/").rsplit("/", 1)[-1]
    return f"{up}analysis/{esc(name)}/html/features/{int(feature)}.html"


def _label(trials: list[dict], size: int) -> str:
    return f"F={trials[size]['n_features']:,}"


# --- figures -------------------------------------------------------------------------------


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)  # Agg without pyplot: no global state, no display
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def matched_png(sizes: list[dict], threshold: float) -> bytes:
    fig, ax = _figure()
    rows = [s for s in sizes if "matched_fraction" in s]
    labels = [f"{s['n_features']:,}" for s in rows]
    ax.bar(labels, [s["matched_fraction"] for s in rows], color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_xlabel("dictionary size")
    ax.set_ylabel(f"fraction with decoder cosine >= {threshold:g}")
    ax.set_title("features with a close match one size down", fontsize=10)
    return _png(fig)


def split_factors_png(sizes: list[dict]) -> bytes:
    fig, ax = _figure()
    rows = [s for s in sizes if "split_factors" in s]
    top = max((int(k) for s in rows for k in s["split_factors"]), default=0)
    x = np.arange(min(top, 8) + 1)
    width = 0.8 / max(len(rows), 1)
    for i, s in enumerate(rows):
        counts = np.zeros(len(x))
        for k, v in s["split_factors"].items():
            counts[min(int(k), len(x) - 1)] += v
        ax.bar(x + i * width, counts / max(counts.sum(), 1), width, color=COLORS[i % 8],
               label=f"{s['n_features']:,} -> next size")
    ax.set_xticks(x + 0.4 - width / 2, [str(v) if v < 8 else "8+" for v in x])
    ax.set_xlabel("split factor (linked children one size up)")
    ax.set_ylabel("fraction of features")
    ax.legend(fontsize=8)
    return _png(fig)


def map_png(cols: dict, trials: list[dict]) -> bytes:
    fig, ax = _figure()
    size, x, y = (np.asarray(cols[k]) for k in ("size", "x", "y"))
    for s in range(len(trials)):
        sel = size == s
        ax.scatter(x[sel], y[sel], s=max(1.0, 12.0 / (s + 1)), color=COLORS[s % 8],
                   label=_label(trials, s), alpha=0.7, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, markerscale=3)
    ax.set_title("decoder directions of every size", fontsize=10)
    return _png(fig)


# --- pages ---------------------------------------------------------------------------------


def index_page(summary: dict, fams: list[dict], trials: list[dict]) -> str:
    rows = []
    for s in summary["sizes"]:
        matched = (f'{s["matched"]:,} ({s["matched_fraction"]:.1%})' if "matched" in s
                   else "-")
        mean = f'{s["mean_parent_cos"]:.3f}' if "mean_parent_cos" in s else "-"
        corr = f'{s["mean_parent_corr"]:.3f}' if "mean_parent_corr" in s else "-"
        split = ", ".join(f"{k}: {v:,}" for k, v in (s.get("split_factors") or {}).items())
        t = trials[s["size"]]
        rows.append(f'<tr><td class="num">{s["n_features"]:,}</td><td class="num">'
                    f'{s["alive"]:,}</td><td>{esc(t["name"])}</td>'
                    f'<td class="num">{matched}</td><td class="num">{mean}</td>'
                    f'<td class="num">{corr}</td><td>{esc(split) or "-"}</td></tr>')
    sizes_table = ('<table id="sizes"><thead><tr><th class="num">features</th><th class='
                   '"num">alive on the sample</th><th>trial</th>'
                   '<th class="num">alive with a close match one size down</th>'
                   '<th class="num">mean parent cosine</th><th class="num">mean parent '
                   'correlation</th><th>split factors (children: features)</th></tr></thead>'
                   '<tbody>' + "".join(rows)
                   + "</tbody></table>")
    fam_rows = []
    for f in fams:
        per = " / ".join(f'{f["per_size"].get(str(s), 0)}' for s in range(len(trials)))
        toks = "".join(f"<code>{esc(t)}</code> " for t in f["tokens"])
        fam_rows.append(f'<tr><td><a href="families/{f["id"]}.html">{f["id"]}</a></td>'
                        f'<td class="num">{len(f["members"])}</td><td class="num">{per}</td>'
                        f'<td>{toks}</td></tr>')
    heads = " / ".join(f"{t['n_features']:,}" for t in trials)
    fam_table = ('<table id="families"><thead><tr><th>family</th><th class="num">features'
                 f'</th><th class="num">per size ({heads})</th><th>top activating tokens'
                 '</th></tr></thead><tbody>' + "".join(fam_rows) + "</tbody></table>")
    body = (f'<nav class="top"><a href="map.html">map of every feature</a></nav>'
            f'<h1>Feature splitting across {len(trials)} dictionary sizes</h1>'
            f'<p class="muted">A feature\'s parent is its nearest decoder direction in the '
            f'next smaller dictionary; it is linked to its {summary["candidates"]} nearest '
            f'there when the decoder cosine is at least {summary["threshold"]:g} and both '
            f'fire on the sample. Families: connected groups of linked features '
            f'({summary["families"]:,}). Activation correlations over '
            f'{summary["sample_rows"]:,} shared rows.</p>'
            + sizes_table + '<div class="grid"><img src="matched.png" alt="fraction matched '
              'per size"><img src="split_factors.png" alt="split factor distribution"></div>'
            + '<h2>Families, largest first</h2>' + fam_table)
    return _page("Feature splitting", body)


def _member_card(cols: dict, at: dict, trials: list[dict], tables: dict, s: int,
                 feat: int) -> str:
    i = at[s][feat]
    href = _feature_href(trials, tables, s, feat, "../../../")
    title = f'<a href="{href}">feature {feat}</a>' if href else f"feature {feat}"
    parts = [f'<div class="card"><h3>{title}</h3><p class="links">density '
             f'{cols["density"][i]:.3g} on the sample']
    if s > 0:
        links = ", ".join(f"{p} (cos {c:.2f}, corr {r:.2f})" for p, c, r in zip(
            cols["parents"][i], cols["parents_cos"][i], cols["parents_corr"][i]))
        parts.append(f"<br>parents in {_label(trials, s - 1)}: {links}")
    if cols["children"][i]:
        kids = ", ".join(f"{c} ({v:.2f})" for c, v in zip(cols["children"][i],
                                                           cols["children_cos"][i]))
        parts.append(f"<br>children in {_label(trials, s + 1)}: {kids}")
    parts.append("</p>")
    if s in tables:
        rows, examples, _ = tables[s]
        row, top = rows[feat], examples["features"][feat]["top"][:5]
        parts.append(f'<p class="links">max activation {row["max_act"]:.3g}, density '
                     f'{row["density"]:.3g} ({esc(row["density_class"])})</p>'
                     + pages._example_rows(top, row["max_act"]))
    return "".join(parts) + "</div>"


def family_page(fam: dict, cols: dict, at: dict, trials: list[dict], tables: dict,
                n_families: int) -> str:
    i = fam["id"]
    nav = ('<nav class="top">' + (f'<a href="{i - 1}.html">&larr; {i - 1}</a>' if i else "")
           + '<a href="../index.html">families</a><a href="../map.html">map</a>'
           + (f'<a href="{i + 1}.html">{i + 1} &rarr;</a>' if i + 1 < n_families else "")
           + "</nav>")
    toks = "".join(f"<code>{esc(t)}</code> " for t in fam["tokens"])
    columns = []
    for s in range(len(trials)):
        feats = [m[1] for m in fam["members"] if m[0] == s]
        cards = "".join(_member_card(cols, at, trials, tables, s, f) for f in feats)
        columns.append(f'<section style="border-color:{COLORS[s % 8]}"><h2>'
                       f'{_label(trials, s)} <span class="muted">({len(feats)})</span></h2>'
                       f'{cards or "<p class=muted>none</p>"}</section>')
    body = (nav + f'<h1>Family {i}</h1><p>{len(fam["members"])} features over '
            f'{len(fam["sizes"])} sizes; top activating tokens {toks}</p>'
            f'<div class="fam">{"".join(columns)}</div>')
    return _page(f"Family {i}", body)


def map_page(cols: dict, trials: list[dict], tables: dict, tokens: dict, max_points: int,
             seed: int) -> str:
    n = len(cols["size"])
    keep = np.arange(n)
    if n > max_points:
        keep = np.sort(np.random.default_rng([seed, 14]).choice(n, max_points, replace=False))
    x, y = np.asarray(cols["x"]), np.asarray(cols["y"])
    lo_x, hi_x, lo_y, hi_y = x.min(), x.max(), y.min(), y.max()
    W, Hh, pad = 960, 680, 12

    def px(v, lo, hi, span):
        return pad + (v - lo) / (hi - lo if hi > lo else 1.0) * (span - 2 * pad)

    points = []
    for i in keep[np.argsort(-np.asarray(cols["size"])[keep], kind="stable")]:
        s, f = int(cols["size"][i]), int(cols["feature"][i])
        href = _feature_href(trials, tables, s, f, "../../")
        fam = cols["family"][i]
        tip = (f"{_label(trials, s)} feature {f}" + (f", family {fam}" if fam >= 0 else "")
               + "\n" + " ".join(tokens.get((s, f), [])))
        circle = (f'<circle cx="{px(x[i], lo_x, hi_x, W):.1f}" '
                  f'cy="{Hh - px(y[i], lo_y, hi_y, Hh):.1f}" r="{max(1.5, 5.0 - s):.1f}" '
                  f'fill="{COLORS[s % 8]}"/>')
        points.append(f'<a href="{href or "#"}"><title>{esc(tip)}</title>{circle}</a>')
    legend = " ".join(f'<span style="color:{COLORS[s % 8]}">&#9679;</span> '
                      f'{_label(trials, s)}' for s in range(len(trials)))
    svg = (f'<svg class="map" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{Hh}" '
           f'viewBox="0 0 {W} {Hh}" role="img" aria-label="map of features">'
           f'<rect width="{W}" height="{Hh}" fill="#fafafa"/>{"".join(points)}</svg>')
    shown = f"{len(keep):,} of {n:,}" if len(keep) < n else f"all {n:,}"
    body = (f'<nav class="top"><a href="index.html">families</a></nav><h1>Map of every '
            f'feature</h1><p class="muted">Decoder directions of every size in 2-D; hover a '
            f'point for its size, id and top activating tokens, click for its page. {shown} '
            f'features drawn; the PNG below has all.</p><p>{legend}</p>{svg}'
            f'<div id="hover"></div><h2>Static map</h2><img src="map.png" alt="feature map">')
    return _page("Feature map", body, _MAP_JS)


def feature_links(cols: dict, at: dict, trials: list[dict], tables: dict, s: int):
    """feature id -> the splitting section of its page in size s's feature browser."""

    def link(size: int, feat: int) -> str:
        href = _feature_href(trials, tables, size, feat, "../../../../")
        return f'<a href="{href}">{feat}</a>' if href else str(feat)

    def extra(feat: int) -> str:
        i = at[s][feat]
        parts = []
        fam = cols["family"][i]
        if fam >= 0:
            parts.append(f'family <a href="../../../../splitting/html/families/{fam}.html">'
                         f'{fam}</a>')
        if s > 0:
            parts.append(f"parents in {_label(trials, s - 1)}: " + ", ".join(
                f"{link(s - 1, p)} (cos {c:.2f}, corr {r:.2f})" for p, c, r in zip(
                    cols["parents"][i], cols["parents_cos"][i], cols["parents_corr"][i])))
        if s + 1 < len(trials):
            kids = ", ".join(f"{link(s + 1, c)} ({v:.2f})" for c, v in zip(
                cols["children"][i], cols["children_cos"][i])) or "none linked"
            parts.append(f"children in {_label(trials, s + 1)}: {kids}; nearest "
                         f"{link(s + 1, cols['best_child'][i])} "
                         f"(cos {cols['best_child_cos'][i]:.2f})")
        return (f'<p class="split">Feature splitting ({_label(trials, s)}): '
                + "; ".join(parts) + "</p>")

    return extra


def write(root: str, cols: dict, fams: list[dict], summary: dict, tables: dict,
          tokens: dict, max_points: int = 30_000, seed: int = 0) -> str:
    """Write <root>/html/ (module doc) and the feature pages' links; -> the index path.
    tables, tokens: what splitting.member_tokens returns (size -> pages.read_tables of the
    trial's analysis; (size, feature) -> top activating tokens)."""
    trials = summary["trials"]
    out = store.join(root, "html")
    size = np.asarray(cols["size"])
    at = {s: np.flatnonzero(size == s) for s in range(len(trials))}   # size -> feature -> row
    store.write_bytes_atomic(store.join(out, "matched.png"),
                             matched_png(summary["sizes"], summary["threshold"]))
    store.write_bytes_atomic(store.join(out, "split_factors.png"),
                             split_factors_png(summary["sizes"]))
    store.write_bytes_atomic(store.join(out, "map.png"), map_png(cols, trials))
    store.write_bytes_atomic(store.join(out, "index.html"),
                             index_page(summary, fams, trials).encode())
    for fam in fams:
        store.write_bytes_atomic(store.join(out, "families", f"{fam['id']}.html"),
                                 family_page(fam, cols, at, trials, tables, len(fams)).encode())
    store.write_bytes_atomic(store.join(out, "map.html"), map_page(
        cols, trials, tables, tokens, max_points, seed).encode())
    for s in tables:
        pages.feature_browser(trials[s]["analysis"], tables=tables[s],
                              extra=feature_links(cols, at, trials, tables, s))
    logger.info("family pages: %d families under %s", len(fams), out)
    return store.join(out, "index.html")
