"""The report of a :class:`~neuromask_pl.analysis.analyze.StrategyAnalysis` as self-contained HTML pages, written into
the analysis folder:

- ``report.html``, the index: the store (path, samples analysed, left out and why, whether its index was merged),
  the settings, every class ranked by suspicion (a sortable table with each class's statistics and a thumbnail of
  its mean mask) and the most suspicious clusters (their mean masks and a few exemplars). No per-sample data: it
  stays light for 1,000 classes.
- ``classes/<target>.html``, one page a class: the 2-D layout of its masks as an SVG scatter coloured by cluster
  (each point names its sample and links to its overlay), the eigenvalues behind the number of clusters, its
  clusters' statistics (a sortable table), and per cluster its mean mask, its exemplars (the samples nearest its
  centre, linked to their overlay and source files) and its members' ids.

The pages open from disk with no server and no network: CSS and JavaScript inline (a Content-Security-Policy
allows nothing else, so nothing is fetched), every image a PNG data URI. An exemplar's thumbnail is the middle
panel (the heat-map overlay) of its ``overlays/<id>.png``, else its mask as a heat map. Every text from the store
(class names, file names, paths) is escaped. numpy, Pillow and the standard library only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image

from neuromask_pl.analysis.analyze import SUSPICIOUS, StrategyAnalysis
from neuromask_pl.store import StoreWriteError, atomic_write, load_results

REPORT_FILE = "report.html"
CLASSES_DIR = "classes"
TOP_CLUSTERS = 50
"""Clusters listed on the index (those with any suspicion, most suspicious first)."""
INDEX_EXEMPLARS = 4
"""Exemplar thumbnails per cluster on the index."""
INDEX_THUMB = 40
EXEMPLAR_THUMB = 96
SCATTER_POINTS = 3000
"""A class's scatter shows at most this many points (its exemplars and an even sample of the rest)."""
MEMBER_IDS = 500
"""A cluster's page lists at most this many member ids."""
OVERLAY_GAP = 4
"""White pixels between the panels of an overlay PNG (:func:`neuromask_pl.viz.explanation_panel`'s ``gap``)."""
OVERLAY_MAX_BYTES = 64 * 2**20

# matplotlib's 'inferno' at 18 even steps: the table of neuromask_pl.viz, so thumbnails match the overlays.
INFERNO = np.array(
    [
        (0.0015, 0.0005, 0.0139), (0.0377, 0.0259, 0.1322), (0.1167, 0.0476, 0.2723), (0.2179, 0.0366, 0.3835),
        (0.3163, 0.0535, 0.4251), (0.4101, 0.0879, 0.4331), (0.5035, 0.1216, 0.4234), (0.5969, 0.1548, 0.3981),
        (0.6887, 0.1922, 0.3576), (0.7751, 0.2397, 0.3035), (0.8514, 0.3023, 0.2396), (0.9130, 0.3816, 0.1698),
        (0.9569, 0.4754, 0.0947), (0.9819, 0.5794, 0.0262), (0.9875, 0.6904, 0.0800), (0.9731, 0.8054, 0.2169),
        (0.9476, 0.9174, 0.4107), (0.9884, 0.9984, 0.6449),
    ]
)  # fmt: skip
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
"""Cluster colours (cluster k gets ``PALETTE[k % 9]``)."""

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.4em}h3{font-size:1.05em;margin:.6em 0 .4em}
table{border-collapse:collapse;font-size:13px}th,td{padding:2px 6px;border-bottom:1px solid #ddd;text-align:right}
th{background:#f3f3f3;position:sticky;top:0}td.t,th.t{text-align:left}
table.sortable th{cursor:pointer;user-select:none}
th[data-dir=asc]::after{content:" \\25B2"}th[data-dir=desc]::after{content:" \\25BC"}
tr.hot td{background:#fff1e6}img.px{image-rendering:pixelated}img{vertical-align:middle}
dl.kv{display:grid;grid-template-columns:max-content auto;gap:2px 12px}dl.kv dt{color:#555}dl.kv dd{margin:0}
.grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;font-size:12px;text-align:center}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}.note{color:#666}code{word-break:break-all}
svg{background:#fafafa;border:1px solid #ddd}svg a circle:hover{stroke:#000;stroke-width:2}
"""

SORT_JS = """
(function(){
function key(row,i,num){var c=row.cells[i];var v=c.hasAttribute('data-v')?c.getAttribute('data-v'):c.textContent;
if(!num)return v.trim().toLowerCase();var x=parseFloat(v);return isNaN(x)?null:x;}
document.querySelectorAll('table.sortable').forEach(function(table){
var heads=table.tHead.rows[0].cells;
Array.prototype.forEach.call(heads,function(th,i){if(th.getAttribute('data-type')==='none')return;
th.addEventListener('click',function(){
var num=th.getAttribute('data-type')==='num';var dir=th.getAttribute('data-dir')==='asc'?'desc':'asc';
Array.prototype.forEach.call(heads,function(h){h.removeAttribute('data-dir');});th.setAttribute('data-dir',dir);
var body=table.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
var keyed=rows.map(function(r,j){return [key(r,i,num),j,r];});var s=dir==='asc'?1:-1;
keyed.sort(function(a,b){if(a[0]===b[0])return a[1]-b[1];if(a[0]===null)return 1;if(b[0]===null)return -1;
if(num)return s*(a[0]-b[0]);return s*(a[0]<b[0]?-1:1);});
var f=document.createDocumentFragment();keyed.forEach(function(k){f.appendChild(k[2]);});body.appendChild(f);
});});});})();
"""

_SCRIPT_HASH = base64.b64encode(hashlib.sha256(SORT_JS.encode()).digest()).decode()
CSP = (
    f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{_SCRIPT_HASH}'; "
    "base-uri 'none'; form-action 'none'"
)
"""The pages' Content-Security-Policy: data: images, inline styles and the one sorting script; nothing is fetched
and no other script runs (an injected one would not, even if it got past the escaping)."""


# -- text, numbers and links ---------------------------------------------------------------------------------------
def esc(value: Any) -> str:
    """``value`` as HTML text (quotes escaped too), any file name made printable UTF-8 (undecodable bytes as
    ``\\xNN``)."""
    text = str(value)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return html.escape(text, quote=True)


def href(path: str | os.PathLike[str], start: Path | None = None) -> str:
    """A link to a local file, escaped for an attribute: relative to the folder ``start`` (the page's) when given,
    else a ``file://`` URL; percent-quoted byte for byte."""
    target = os.fsencode(os.path.relpath(path, start) if start is not None else os.path.abspath(path))
    if os.sep != "/":
        target = target.replace(os.fsencode(os.sep), b"/")
    url = quote(target, safe="/")
    return esc(url if start is not None else "file://" + ("" if url.startswith("/") else "/") + url)


def number(value: Any, digits: int = 3) -> tuple[str, str]:
    """A number's shown text (``digits`` decimals for a float) and its sort key (``data-v``): ``-`` and an empty
    key for None or NaN."""
    if value is None or isinstance(value, str):
        return ("-", "") if value in (None, "") else (esc(value), esc(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value)), str(int(value))
    value = float(value)
    if math.isnan(value):
        return "-", ""
    return f"{value:.{digits}f}", repr(value)


def _cell(value: Any, digits: int = 3) -> str:
    shown, key = number(value, digits)
    return f'<td data-v="{key}">{shown}</td>'


# -- images --------------------------------------------------------------------------------------------------------
def _inferno_lut(levels: int = 256) -> np.ndarray:
    """:data:`INFERNO` interpolated to ``levels`` uint8 RGB colours."""
    pos = np.linspace(0.0, len(INFERNO) - 1, levels)
    low = np.minimum(pos.astype(np.int64), len(INFERNO) - 2)
    frac = (pos - low)[:, None]
    return np.round((INFERNO[low] * (1.0 - frac) + INFERNO[low + 1] * frac) * 255.0).astype(np.uint8)


_LUT = _inferno_lut()


def heat(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape; NaN as 0) as inferno RGB, uint8 with a trailing axis of 3."""
    v = np.clip(np.nan_to_num(np.asarray(values, np.float32), nan=0.0), 0.0, 1.0)
    return _LUT[np.rint(v * (len(_LUT) - 1)).astype(np.intp)]


def png_uri(image: np.ndarray | Image.Image) -> str:
    """An RGB image (H x W x 3 uint8, or a Pillow image) as a ``data:image/png;base64,...`` URI."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def mask_image(mask: np.ndarray, size: int) -> Image.Image:
    """A mask (H x W in [0, 1]) as a heat map fitting in ``size x size`` (aspect kept; a smaller mask is kept at
    its size, for the page to scale up)."""
    h, w = mask.shape
    if max(h, w) > size:
        scale = size / max(h, w)
        shape = (max(1, round(w * scale)), max(1, round(h * scale)))
        mask = np.asarray(Image.fromarray(np.asarray(mask, np.float32), mode="F").resize(shape, Image.Resampling.BOX))
    return Image.fromarray(heat(mask))


def mean_mask_img(mean: np.ndarray, size: int, title: str = "") -> str:
    """An ``<img>`` of a mean mask at its grid's size, scaled up without smoothing; bright = kept. The mean is
    stretched to its own maximum so faint strategies stay visible."""
    top = float(np.nanmax(mean)) if mean.size else 0.0
    src = png_uri(heat(mean / top if top > 0 else mean))
    return f'<img class="px" width="{size}" height="{size}" alt="mean mask" title="{esc(title)}" src="{src}">'


class SampleFiles:
    """What the pages show of a sample: its overlay and source files (when they exist) and its thumbnail (made once
    per size): the heat-map overlay cropped out of its overlay PNG, else its mask from the store as a heat map, else
    its downsampled mask from the analysis."""

    def __init__(self, analysis: StrategyAnalysis) -> None:
        self.analysis = analysis
        self.root = analysis.root.resolve()
        self.thumbs: dict[tuple[int, int], str] = {}
        self.stack = contextlib.ExitStack()
        self.results: Any = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.results = self.stack.enter_context(load_results(analysis.root))
        except Exception:  # a store moved or damaged since the analysis: the downsampled masks remain
            self.results = None
        shapes = analysis.table.shapes
        self.shape = next(iter(shapes)) if len(shapes) == 1 else None

    def close(self) -> None:
        self.stack.close()

    def row(self, sample_id: int) -> int | None:
        """The sample's position in the analysis's table."""
        ids = self.analysis.table.ids
        i = int(np.searchsorted(ids, sample_id))
        return i if i < len(ids) and ids[i] == sample_id else None

    def overlay(self, sample_id: int) -> Path | None:
        """The sample's overlay PNG when its row names one inside the store and it is a regular file there."""
        i = self.row(sample_id)
        name = self.analysis.table.overlays[i] if i is not None else ""
        if not name or os.path.isabs(name) or ".." in Path(name).parts:
            return None
        path = self.analysis.root / name
        try:
            return path if path.resolve().is_relative_to(self.root) and path.is_file() else None
        except (OSError, ValueError):
            return None

    def source(self, sample_id: int) -> tuple[str, Path | None]:
        """The file name the sample's row gives (``''`` when none) and the file when it exists (``skimage:chelsea``
        and the like are not files); a relative name is taken from the working folder."""
        i = self.row(sample_id)
        name = self.analysis.table.paths[i] if i is not None else ""
        if not name:
            return "", None
        try:
            path = Path(name).absolute()
            return name, path if path.is_file() else None
        except (OSError, ValueError):
            return name, None

    def thumb(self, sample_id: int, size: int) -> str:
        """The data URI of the sample's thumbnail, fitting in ``size x size``."""
        key = (int(sample_id), size)
        if key not in self.thumbs:
            image = self._overlay_panel(sample_id, size) or self._mask_image(sample_id, size)
            self.thumbs[key] = png_uri(image)
        return self.thumbs[key]

    def _mask(self, sample_id: int) -> np.ndarray | None:
        if self.results is None:
            return None
        try:
            mask = self.results.mask(int(sample_id))
        except Exception:
            return None
        return mask if mask is not None and mask.ndim == 2 and mask.size else None

    def _mask_image(self, sample_id: int, size: int) -> Image.Image:
        mask = self._mask(sample_id)
        if mask is None:
            table = self.analysis.table
            mask = table.features[self.row(sample_id)].reshape(table.grid, table.grid)
        return mask_image(mask, size)

    def _overlay_panel(self, sample_id: int, size: int) -> Image.Image | None:
        """The middle panel of the sample's overlay (original | overlay | image x mask, each the mask's size, a
        caption below), or None when there is no overlay or it is not laid out so."""
        path = self.overlay(sample_id)
        if path is None:
            return None
        shape = self.shape
        if shape is None:
            mask = self._mask(sample_id)
            shape = None if mask is None else mask.shape
        if shape is None:
            return None
        h, w = shape
        try:
            if path.stat().st_size > OVERLAY_MAX_BYTES:
                return None
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as png:
                    if png.width < 3 * w + 2 * OVERLAY_GAP or png.height < h:
                        return None
                    panel = np.asarray(png.convert("RGB").crop((0, 0, 3 * w + 2 * OVERLAY_GAP, h)))
        except Exception:  # not a PNG, damaged, too large: the mask instead
            return None
        gaps = np.r_[w : w + OVERLAY_GAP, 2 * w + OVERLAY_GAP : 2 * w + 2 * OVERLAY_GAP]
        if not (panel[:, gaps] == 255).all():
            return None
        middle = Image.fromarray(panel[:, w + OVERLAY_GAP : 2 * w + OVERLAY_GAP])
        middle.thumbnail((size, size), Image.Resampling.LANCZOS)
        return middle


# -- pages ---------------------------------------------------------------------------------------------------------
def page(title: str, body: str) -> str:
    """A complete page: ``title`` (escaped here) and ``body`` (HTML), with the CSS, the sorting script and the
    Content-Security-Policy."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="data:,"><title>{esc(title)}</title><style>{CSS}</style></head>\n'
        f"<body>\n{body}\n<script>{SORT_JS}</script>\n</body></html>\n"
    )


def sortable(columns: list[tuple[str, str, str]], rows: list[str], table_id: str) -> str:
    """A table sorted by clicking a header; ``columns`` are (label, ``num`` or ``text``, tooltip), ``rows`` the
    ``<tr>`` elements. The first column starts sorted ascending."""
    heads = "".join(
        f'<th data-type="{kind}"{" data-dir=asc" if i == 0 else ""}{" class=t" if kind != "num" else ""}'
        f' title="{esc(tip)}">{esc(label)}</th>'
        for i, (label, kind, tip) in enumerate(columns)
    )
    body = "\n".join(rows)
    return f'<table class="sortable" id="{table_id}"><thead><tr>{heads}</tr></thead><tbody>\n{body}\n</tbody></table>'


def class_page_name(target: int) -> str:
    return f"{CLASSES_DIR}/{int(target)}.html"


def _settings_html(analysis: StrategyAnalysis) -> str:
    items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in analysis.settings.items())
    return f'<dl class="kv">{items}</dl>'


def summary_html(analysis: StrategyAnalysis) -> str:
    """The store, what was analysed and left out, the settings, and links to the analysis's other files."""
    store = analysis.store
    left = store.get("left_out") or {}
    left_html = ", ".join(f"{esc(n)} {esc(why)}" for why, n in left.items()) or "none"
    shapes = ", ".join(f"{esc(k)}: {esc(v)}" for k, v in (store.get("mask_shapes") or {}).items()) or "-"
    complete = (
        "yes (its index is merged)"
        if store.get("complete")
        else "no: the job has not finished or its index was not merged; what its shards held was analysed"
    )
    suspicious = len(analysis.suspicious())
    facts = [
        ("store", f"<code>{esc(store.get('path', analysis.root))}</code>"),
        ("samples stored", esc(store.get("stored", "-"))),
        ("samples analysed", esc(store.get("analysed", len(analysis.table)))),
        ("left out", left_html),
        ("store complete", esc(complete)),
        ("mask sizes (H x W: count)", shapes),
        ("classes", esc(len(analysis.classes))),
        ("clusters", esc(len(analysis.clusters))),
        (f"suspicious clusters (suspicion >= {SUSPICIOUS})", esc(suspicious)),
        ("analysis time", f"{analysis.seconds:.1f} s"),
    ]
    files = " ".join(
        f'<a href="{esc(name)}">{esc(name)}</a>'
        for name in ("classes.csv", "clusters.csv", "strategies.csv", "summary.json", "means.npz")
    )
    rows = "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in facts)
    return (
        f'<h2>Summary</h2><div class="row"><dl class="kv">{rows}<dt>files</dt><dd>{files}</dd></dl>'
        f"<div><h3>Settings</h3>{_settings_html(analysis)}</div></div>"
    )


CLASS_COLUMNS = [
    ("rank", "num", "1 = most suspicious"),
    ("class", "text", "the explained class"),
    ("target", "num", "the class index"),
    ("samples", "num", "masks analysed"),
    ("clusters", "num", "strategies found"),
    ("suspicion", "num", "the suspicion of the class's most suspicious cluster"),
    ("mask area", "num", "mean share of the image kept"),
    ("kept rate", "num", "share of masks that keep the class"),
    ("off-object", "num", "share of mask mass off the object"),
    ("corners", "num", "share of the mean mask's mass in the corners"),
    ("border", "num", "share of the mean mask's mass in the outer ring"),
    ("centre", "num", "share of the mean mask's mass in the centre"),
    ("mean mask", "none", "the class's mean mask (bright = kept)"),
]


def class_rows(analysis: StrategyAnalysis, off_object: bool) -> list[str]:
    """One ``<tr>`` per class, in rank order, linking to its page."""
    rows = []
    for c in analysis.classes:
        name, target = c["target_name"], c["target"]
        hot = ' class="hot"' if c["suspicion"] >= SUSPICIOUS else ""
        cells = [
            _cell(c["rank"]),
            f'<td class="t" data-v="{esc(name)}"><a href="{class_page_name(target)}">{esc(name)}</a></td>',
            _cell(target),
            _cell(c["samples"]),
            _cell(c["clusters"]),
            _cell(c["suspicion"]),
            _cell(c["mask_area"]),
            _cell(c["kept_rate"], 2),
            *([_cell(c["off_object"])] if off_object else []),
            _cell(c["mass_corners"]),
            _cell(c["mass_border"]),
            _cell(c["mass_centre"]),
            f'<td class="t">{mean_mask_img(analysis.class_means[target], 32, name)}</td>',
        ]
        rows.append(f"<tr{hot}>{''.join(cells)}</tr>")
    return rows


CLUSTER_COLUMNS = [
    ("rank", "num", "1 = most suspicious"),
    ("class", "text", "the explained class"),
    ("cluster", "num", "0 = the class's main strategy"),
    ("size", "num", "masks in the cluster"),
    ("share", "num", "share of its class"),
    ("suspicion", "num", "offness x (1 - share) x tightness x support"),
    ("offness", "num", "share of its mass in cells of its own, where the rest of its class does not look"),
    ("mask area", "num", "mean share of the image kept"),
    ("corners", "num", "share of the mean mask's mass in the corners"),
    ("border", "num", "share of the mean mask's mass in the outer ring"),
    ("centre", "num", "share of the mean mask's mass in the centre"),
    ("mean mask", "none", "the cluster's mean mask (bright = kept)"),
    ("exemplars", "none", "the masks nearest the cluster's centre"),
]


def thumb_img(files: SampleFiles, sample_id: int, size: int) -> str:
    """The ``<img>`` of a sample's thumbnail in a ``size x size`` box."""
    sample_id = int(sample_id)
    return (
        f'<img class="px" width="{size}" height="{size}" style="object-fit:contain" alt="sample {sample_id}" '
        f'title="sample {sample_id}" src="{files.thumb(sample_id, size)}">'
    )


def cluster_rows(analysis: StrategyAnalysis, clusters: list[dict[str, Any]], files: SampleFiles) -> list[str]:
    """One ``<tr>`` per cluster, linking to its section of its class's page."""
    rows = []
    for c in clusters:
        target, k, name = c["target"], int(c["cluster"]), c["target_name"]
        link = f"{class_page_name(target)}#cluster-{k}"
        exemplars = "".join(thumb_img(files, i, INDEX_THUMB) for i in c["exemplars"][:INDEX_EXEMPLARS])
        hot = ' class="hot"' if c["suspicion"] >= SUSPICIOUS else ""
        cells = [
            _cell(c["rank"]),
            f'<td class="t" data-v="{esc(name)}"><a href="{class_page_name(target)}">{esc(name)}</a></td>',
            _cell(k),
            _cell(c["size"]),
            _cell(c["share"]),
            _cell(c["suspicion"]),
            _cell(c["offness"]),
            _cell(c["mask_area"]),
            _cell(c["mass_corners"]),
            _cell(c["mass_border"]),
            _cell(c["mass_centre"]),
            f'<td class="t">{mean_mask_img(analysis.cluster_means[(target, k)], INDEX_THUMB)}</td>',
            f'<td class="t"><a href="{link}">{exemplars}</a></td>',
        ]
        rows.append(f"<tr{hot}>{''.join(cells)}</tr>")
    return rows


def index_html(analysis: StrategyAnalysis, files: SampleFiles) -> str:
    """The index page: summary, classes ranked by suspicion, the most suspicious clusters."""
    off_object = any(c["off_object"] is not None for c in analysis.classes)
    columns = [col for col in CLASS_COLUMNS if off_object or col[0] != "off-object"]
    top = [c for c in analysis.clusters if c["suspicion"] > 0][:TOP_CLUSTERS]
    if top:
        clusters = sortable(CLUSTER_COLUMNS, cluster_rows(analysis, top, files), "clusters")
    else:
        clusters = '<p class="note">No cluster has any suspicion: every class is one strategy.</p>'
    body = [
        "<h1>Strategies of the classifier, class by class</h1>",
        '<p class="note">SpRAy over the masks of a store: each class\'s masks clustered into strategies; a small, '
        "tight cluster that looks where the rest of its class does not is suspicious (a possible shortcut). "
        f"Rows at or above suspicion {SUSPICIOUS} are highlighted. Click a header to sort; a class opens its "
        "page.</p>",
        summary_html(analysis),
        f"<h2>Classes ranked by suspicion ({len(analysis.classes)})</h2>",
        sortable(columns, class_rows(analysis, off_object), "classes"),
        f"<h2>Most suspicious clusters (top {len(top)} with any suspicion)</h2>",
        clusters,
    ]
    return page("Strategy analysis", "\n".join(body))


def scatter_svg(
    analysis: StrategyAnalysis, where: np.ndarray, highlight: set[int], files: SampleFiles, page_dir: Path,
    size: int = 340,
) -> str:  # fmt: skip
    """The class's 2-D layout as an SVG: one point per sample (at most :data:`SCATTER_POINTS`: the ``highlight``
    ids, drawn larger, and an even share of the rest), coloured by cluster, each with a tooltip naming its sample
    and a link to its overlay when there is one."""
    table = analysis.table
    shown, note = where, ""
    if len(where) > SCATTER_POINTS:
        keep = np.isin(table.ids[where], list(highlight))
        rest = np.flatnonzero(~keep)
        keep[rest[np.linspace(0, len(rest) - 1, max(SCATTER_POINTS - int(keep.sum()), 1)).astype(int)]] = True
        shown = where[keep]
        note = f'<p class="note">{len(shown)} of {len(where)} samples shown.</p>'
    xy = analysis.layout[shown].astype(np.float64)
    low, high = xy.min(axis=0), xy.max(axis=0)
    span = np.where(high - low > 0, high - low, 1.0)
    pad = 10
    pos = pad + (xy - low) / span * (size - 2 * pad)
    points = []
    for (x, y), i in zip(pos, shown):
        sample_id, k = int(table.ids[i]), int(analysis.labels[i])
        circle = (
            f'<circle cx="{x:.1f}" cy="{size - y:.1f}" r="{5 if sample_id in highlight else 3.5}" '
            f'fill="{PALETTE[k % len(PALETTE)]}" fill-opacity="0.8"><title>sample {sample_id}, cluster {k}</title>'
            "</circle>"
        )
        overlay = files.overlay(sample_id)
        points.append(f'<a href="{href(overlay, page_dir)}">{circle}</a>' if overlay else circle)
    return (
        f'<svg width="{size}" height="{size}" viewBox="0 0 {size} {size}" role="img" '
        f'aria-label="layout of the class\'s masks">{"".join(points)}</svg>{note}'
    )


def eigen_svg(values: np.ndarray, k: int, separated: float, width: int = 260, height: int = 140) -> str:
    """The smallest eigenvalues of the class's graph Laplacian as bars (the first ``k``, the clusters chosen, in
    colour) with the ``separated`` level dashed."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return ""
    top = max(float(values.max()), separated) * 1.1 or 1.0
    step = (width - 20) / len(values)
    bars = []
    for j, v in enumerate(values):
        h = max(1.0, v / top * (height - 20))
        colour = "#e15759" if j < k else "#999"
        bars.append(
            f'<rect x="{10 + j * step + 1:.1f}" y="{height - 10 - h:.1f}" width="{max(step - 2, 1):.1f}" '
            f'height="{h:.1f}" fill="{colour}"><title>eigenvalue {j + 1}: {v:.4f}</title></rect>'
        )
    level = height - 10 - separated / top * (height - 20)
    line = (
        f'<line x1="10" x2="{width - 10}" y1="{level:.1f}" y2="{level:.1f}" stroke="#333" stroke-dasharray="4 3">'
        f"<title>separated = {separated}</title></line>"
    )
    return f'<svg width="{width}" height="{height}" role="img" aria-label="eigenvalues">{"".join(bars)}{line}</svg>'


STAT_COLUMNS = (
    ("cluster", "cluster", 0, "0 = the class's main strategy (its largest cluster)"),
    ("rank", "rank", 0, "over all clusters, 1 = most suspicious"),
    ("size", "size", 0, "masks in the cluster"),
    ("share", "share", 3, "share of its class"),
    ("suspicion", "suspicion", 3, "offness x (1 - share) x tightness x support"),
    ("offness", "offness", 3, "share of its mean mask's mass where the rest of its class does not look"),
    ("distance_to_main", "to main", 3, "total variation between its mean mask and the main strategy's"),
    ("spread", "spread", 4, "mean distance of its masks to their mean (per cell)"),
    ("concentration", "concentration", 3, "1 - the normalised entropy of its mean mask"),
    ("mask_area", "mask area", 3, "mean share of the image kept"),
    ("mass_corners", "corners", 3, "share of the mean mask's mass in the corners"),
    ("mass_border", "border", 3, "share of the mean mask's mass in the outer ring"),
    ("mass_centre", "centre", 3, "share of the mean mask's mass in the centre"),
    ("centre_x", "x", 2, "centre of mass, 0 = left"),
    ("centre_y", "y", 2, "centre of mass, 0 = top"),
    ("kept_rate", "kept rate", 2, "share of masks that keep the class"),
    ("off_object", "off-object", 3, "share of mask mass off the object"),
)
"""The columns of a class page's cluster table: key, label, decimals, tooltip."""


def cluster_table(clusters: list[dict[str, Any]]) -> str:
    """A class's clusters as a sortable table, each row linking to its section."""
    rows = []
    for c in clusters:
        k = int(c["cluster"])
        cells = [
            f'<td data-v="{k}"><a href="#cluster-{k}"><span style="color:{PALETTE[k % len(PALETTE)]}">&#9679;</span>'
            f" {k}</a></td>",
            *(_cell(c.get(key), digits) for key, _, digits, _ in STAT_COLUMNS[1:]),
        ]
        hot = ' class="hot"' if c["suspicion"] >= SUSPICIOUS else ""
        rows.append(f"<tr{hot}>{''.join(cells)}</tr>")
    columns = [(label, "num", tip) for _, label, _, tip in STAT_COLUMNS]
    return sortable(columns, rows, "class-clusters")


def exemplar_figure(sample_id: int, files: SampleFiles, page_dir: Path) -> str:
    """An exemplar's thumbnail and id, linked to its overlay; its source file's name below, linked when the file
    exists."""
    sample_id = int(sample_id)
    img = thumb_img(files, sample_id, EXEMPLAR_THUMB)
    overlay = files.overlay(sample_id)
    if overlay is not None:
        img = f'<a href="{href(overlay, page_dir)}" title="the overlay of sample {sample_id}">{img}</a>'
    name, source = files.source(sample_id)
    caption = f"#{sample_id}"
    if name:
        shown = esc(os.path.basename(name) or name)
        caption += (
            f'<br><a class="source" href="{href(source)}" title="{esc(name)}">{shown}</a>'
            if source
            else f'<br><span class="source" title="{esc(name)}">{shown}</span>'
        )
    return f'<figure id="s{sample_id}">{img}<figcaption>{caption}</figcaption></figure>'


def cluster_section(analysis: StrategyAnalysis, cluster: dict[str, Any], files: SampleFiles, page_dir: Path) -> str:
    """A cluster's mean mask, exemplars and member ids."""
    target, k = cluster["target"], int(cluster["cluster"])
    figures = "".join(exemplar_figure(i, files, page_dir) for i in cluster["exemplars"])
    members = analysis.members(target, k)
    more = f" and {len(members) - MEMBER_IDS} more" if len(members) > MEMBER_IDS else ""
    ids = " ".join(str(int(i)) for i in members[:MEMBER_IDS])
    hot = " (suspicious)" if cluster["suspicion"] >= SUSPICIOUS else ""
    return (
        f'<section id="cluster-{k}"><h3><span style="color:{PALETTE[k % len(PALETTE)]}">&#9679;</span> '
        f"Cluster {k}{hot}: {int(cluster['size'])} masks, suspicion {cluster['suspicion']:.3f}</h3>"
        f'<div class="row"><figure>{mean_mask_img(analysis.cluster_means[(target, k)], EXEMPLAR_THUMB)}'
        f'<figcaption>mean mask</figcaption></figure><div class="grid exemplars">{figures}</div></div>'
        f"<details><summary>members ({len(members)})</summary><p><code>{ids}{more}</code></p></details></section>"
    )


def class_html(
    analysis: StrategyAnalysis, summary: dict[str, Any], clusters: list[dict[str, Any]], files: SampleFiles,
    page_dir: Path,
) -> str:  # fmt: skip
    """A class's page: its figures, layout scatter and eigenvalues, its clusters (``clusters``, in cluster order)
    as a table, and a section per cluster, the most suspicious first."""
    target, name = summary["target"], summary["target_name"]
    where = np.flatnonzero(analysis.table.targets == target)
    legend = " ".join(
        f'<a href="#cluster-{int(c["cluster"])}"><span style="color:{PALETTE[int(c["cluster"]) % len(PALETTE)]}">'
        f"&#9679;</span> cluster {int(c['cluster'])} ({int(c['size'])})</a>"
        for c in clusters
    )
    facts = "".join(
        f"<dt>{label}</dt><dd>{value}</dd>"
        for label, value in (
            ("rank", esc(summary["rank"])),
            ("samples", esc(summary["samples"])),
            ("clusters", f"{esc(summary['clusters'])} (chosen by {esc(summary['chosen_by'])})"),
            ("suspicion", number(summary["suspicion"])[0]),
            ("mask area", number(summary["mask_area"])[0]),
            ("kept rate", number(summary["kept_rate"], 2)[0]),
            ("off-object", number(summary["off_object"])[0]),
        )
    )
    highlight = {int(i) for c in clusters for i in c["exemplars"]}
    eigen = eigen_svg(
        analysis.eigenvalues.get(target, np.zeros(0)), int(summary["clusters"]),
        float(analysis.settings.get("separated", 0.1)),
    )  # fmt: skip
    body = [
        f'<p><a href="../{REPORT_FILE}">&larr; all classes</a></p>',
        f'<h1>{esc(name)} <span class="note">(class {esc(target)})</span></h1>',
        f'<div class="row"><div><dl class="kv">{facts}</dl><figure>'
        f"{mean_mask_img(analysis.class_means[target], EXEMPLAR_THUMB, 'mean mask')}"
        "<figcaption>mean mask</figcaption></figure></div>",
        "<div><h3>Layout of its masks</h3>",
        scatter_svg(analysis, where, highlight, files, page_dir),
        f"<p>{legend}</p></div>",
        f'<div><h3>Eigenvalues</h3>{eigen}<p class="note">the smallest of the graph\'s normalised Laplacian;<br>'
        "the first k in colour; dashed: <i>separated</i></p></div></div>",
        "<h2>Clusters</h2>",
        cluster_table(clusters),
        '<p class="note">Most suspicious first: each cluster\'s mean mask, then its exemplars (the masks nearest '
        "its centre), each linked to its overlay.</p>",
        *(cluster_section(analysis, c, files, page_dir) for c in sorted(clusters, key=lambda c: c["rank"])),
    ]
    return page(f"Class {name}", "\n".join(body))


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_report(analysis: StrategyAnalysis, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``report.html`` and ``classes/<target>.html`` (one per class) into ``out_dir``, each atomically;
    returns the path of ``report.html``.

    Raises:
        StoreWriteError: the folder cannot be written (read-only, disk full, a symbolic link in place of
            ``classes/``).
    """
    out = Path(out_dir)
    pages = out / CLASSES_DIR
    by_class: dict[int, list[dict[str, Any]]] = {}
    for cluster in sorted(analysis.clusters, key=lambda c: (c["target"], c["cluster"])):
        by_class.setdefault(cluster["target"], []).append(cluster)
    files = SampleFiles(analysis)
    try:
        for folder in (out, pages):
            if folder.is_symlink():
                raise OSError(f"'{folder}' is a symbolic link; give a real folder")
            folder.mkdir(parents=True, exist_ok=True)
        for summary in analysis.classes:
            target = summary["target"]
            text = class_html(analysis, summary, by_class.get(target, []), files, pages)
            _write_text(out / class_page_name(target), text)
        _write_text(out / REPORT_FILE, index_html(analysis, files))
    except OSError as err:
        raise StoreWriteError(f"could not write the report into '{out}': {err}") from err
    finally:
        files.close()
    return out / REPORT_FILE
