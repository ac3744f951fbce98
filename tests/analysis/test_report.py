"""The HTML report of an analysis (neuromask_pl.analysis.report): its files, what they hold, escaping of hostile
names, thumbnails cut from overlays; then in a real browser (Debian's chromium through playwright, pytest mark
``browser``): no errors, the planted class first, sorting, links, decoded images, and a report of many classes."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from neuromask_pl.analysis import analyze
from neuromask_pl.analysis.report import INFERNO, SampleFiles, heat, write_report
from neuromask_pl.analysis.synthetic import write_synthetic_store
from neuromask_pl.store import ShardWriter, StoreWriteError, merge_index, open_store
from neuromask_pl.viz import _INFERNO, captioned_panel, colormap, overlay, save_png, to_uint8

SCRIPT_NAME = "<script>alert(1)</script>"
IMG_NAME = 'a"><img src=x onerror=alert(1)>'


# -- stores --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A synthetic store (6 classes, a frame planted in 30 % of class 2) analysed with its report."""
    root = tmp_path_factory.mktemp("planted")
    cue_ids = write_synthetic_store(root, classes=6, per_class=30, size=32, planted={2: ("frame", 0.3)})
    analysis = analyze(root, layout="spectral")
    return analysis, cue_ids[2]


def planted_cluster(analysis, cue_ids: np.ndarray) -> dict:
    """The cluster of class 2 that holds most of the cue images."""
    clusters = [c for c in analysis.clusters if c["target"] == 2]
    return max(clusters, key=lambda c: np.isin(analysis.members(2, c["cluster"]), cue_ids).sum())


def write_hostile_store(root: Path, outside: Path) -> dict[int, np.ndarray]:
    """Two classes of 12 masks with hostile names: class 0 ``<script>...`` with overlay PNGs (one names a file
    outside the store), class 1 ``a"><img ...>`` whose samples name a source file of that name or a pseudo-path.
    Returns the images of the samples with overlays."""
    rng = np.random.default_rng(0)
    open_store(root, {"hostile": 1}, sample_dirs=("overlays",))
    source = outside / f"{IMG_NAME}.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(source)
    (outside / "secret.png").write_bytes(b"not for the report")
    images = {}
    with ShardWriter(root, 0, chunk_size=8) as writer:
        for sample_id in range(24):
            target = sample_id // 12
            mask = np.zeros((32, 32), np.float32)
            y, x = rng.integers(0, 24, 2)
            mask[y : y + 8, x : x + 8] = 1.0
            row = {"status": "ok", "target": target, "target_name": SCRIPT_NAME if target == 0 else IMG_NAME}
            if target == 0:
                image = torch.from_numpy(rng.random((3, 32, 32), dtype=np.float32))
                name = f"overlays/{sample_id:08d}.png"
                save_png(captioned_panel(image, torch.from_numpy(mask), label=row["target_name"]), root / name)
                images[sample_id] = image
                row["overlay_file"] = "../secret.png" if sample_id == 0 else name
                row["path"] = "skimage:chelsea"
            else:
                row["path"] = str(source)
            writer.add(sample_id, mask.astype(np.float16), row)
    merge_index(root)
    return images


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    outside = tmp_path_factory.mktemp("hostile")
    root = outside / "store"
    images = write_hostile_store(root, outside)
    analysis = analyze(root, layout="spectral", k=1)
    return analysis, images, outside


def pages(analysis) -> list[Path]:
    out = analysis.output_dir
    return [out / "report.html", *sorted((out / "classes").glob("*.html"))]


class Links(HTMLParser):
    """Every src and href of a page, and the text of its elements."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs) -> None:
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        self.urls += [value for key, value in attrs.items() if key in ("src", "href") and value is not None]


def parse(path: Path) -> Links:
    parser = Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


# -- without a browser ---------------------------------------------------------------------------------------------
def test_the_report_and_a_page_per_class_are_written(planted) -> None:
    analysis, _ = planted
    out = analysis.output_dir
    assert (out / "report.html").is_file()
    assert sorted(p.name for p in (out / "classes").glob("*.html")) == sorted(f"{k}.html" for k in range(6))
    again = write_report(analysis, out)
    assert again == out / "report.html"
    assert not list(out.rglob(".*.tmp"))


def test_the_pages_load_nothing_from_outside(planted) -> None:
    analysis, _ = planted
    for path in pages(analysis):
        text = path.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text
        for url in parse(path).urls:
            scheme = urlparse(url).scheme
            assert scheme in ("", "data", "file"), (path.name, url)
            if scheme == "data":
                assert url.startswith("data:image/png;base64,") or url == "data:,"
        assert "Content-Security-Policy" in text


def test_the_planted_class_ranks_first_and_its_page_shows_the_planted_exemplars(planted) -> None:
    analysis, cue_ids = planted
    index = parse(analysis.output_dir / "report.html")
    class_links = [a["href"] for tag, a in index.tags if tag == "a" and re.fullmatch(r"classes/\d+\.html", a["href"])]
    assert class_links[0] == "classes/2.html"
    cluster = planted_cluster(analysis, cue_ids)
    assert set(cluster["exemplars"].tolist()) <= set(cue_ids.tolist())
    page = (analysis.output_dir / "classes" / "2.html").read_text(encoding="utf-8")
    assert f'id="cluster-{cluster["cluster"]}"' in page
    for sample_id in cluster["exemplars"]:
        assert f'id="s{sample_id}"' in page
    # the index holds no per-sample exemplar figures
    assert 'id="s' not in (analysis.output_dir / "report.html").read_text(encoding="utf-8")


def test_hostile_names_are_text_and_links_are_quoted(hostile) -> None:
    analysis, _, outside = hostile
    for path in pages(analysis):
        text = path.read_text(encoding="utf-8")
        assert "<script>alert" not in text and "<img src=x" not in text and "onerror=alert(1)>" not in text
        assert all(tag != "img" or a.get("src", "").startswith("data:") for tag, a in parse(path).tags)
        assert "secret.png" not in text  # an overlay outside the store is neither linked nor read
    index = (analysis.output_dir / "report.html").read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index
    assert "a&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in index
    page = parse(analysis.output_dir / "classes" / "1.html")
    sources = [a["href"] for tag, a in page.tags if tag == "a" and "source" in a.get("class", "")]
    assert sources and all(unquote(urlparse(url).path) == str(outside / f"{IMG_NAME}.png") for url in sources)
    assert all("%22%3E%3Cimg%20src%3Dx" in url for url in sources)
    page0 = (analysis.output_dir / "classes" / "0.html").read_text(encoding="utf-8")
    assert "skimage:chelsea" in page0 and 'href="skimage' not in page0  # a pseudo-path is text, not a link
    overlays = [u for u in parse(analysis.output_dir / "classes" / "0.html").urls if "overlays/" in u]
    assert overlays and all(u.startswith("../../overlays/") for u in overlays)


def test_an_exemplar_thumbnail_is_the_overlay_panel_of_its_png(hostile) -> None:
    analysis, images, _ = hostile
    files = SampleFiles(analysis)
    try:
        for sample_id in (3, 7):
            mask = torch.from_numpy(files.results.mask(sample_id))
            with Image.open(analysis.root / f"overlays/{sample_id:08d}.png") as png:
                assert png.height > 32  # the caption below the panel
            # the PNG was drawn from the float32 mask; the stored float16 one rounds 0 and 1 exactly
            expected = to_uint8(overlay(images[sample_id], mask))
            np.testing.assert_array_equal(np.asarray(files._overlay_panel(sample_id, 96)), expected)
            small = files._overlay_panel(sample_id, 16)
            assert small.size == (16, 16)
        # the overlay named outside the store is not used: the mask's heat map instead
        assert files._overlay_panel(0, 96) is None
        np.testing.assert_array_equal(np.asarray(files._mask_image(0, 96)), heat(files.results.mask(0)))
    finally:
        files.close()


def test_without_the_stores_masks_the_thumbnails_come_from_the_grid(tmp_path) -> None:
    root = tmp_path / "store"
    write_synthetic_store(root, classes=2, per_class=12, size=16)
    analysis = analyze(root, layout="spectral", write=False)
    shutil.rmtree(root / "shards")
    report = write_report(analysis, tmp_path / "out")
    assert report.is_file() and len(list((tmp_path / "out" / "classes").glob("*.html"))) == 2


def test_a_symbolic_link_in_place_of_the_class_pages_is_refused(tmp_path) -> None:
    root = tmp_path / "store"
    write_synthetic_store(root, classes=2, per_class=12, size=16)
    analysis = analyze(root, layout="spectral", write=False)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "classes").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StoreWriteError, match="symbolic link"):
        write_report(analysis, tmp_path / "out")
    assert not list((tmp_path / "elsewhere").iterdir())


def test_the_colour_map_is_the_overlays(planted) -> None:
    np.testing.assert_allclose(INFERNO, _INFERNO.numpy(), atol=1e-6)
    values = torch.linspace(0, 1, 1001)
    expected = to_uint8(colormap(values[None]))[0].astype(int)
    assert np.abs(heat(values.numpy()).astype(int) - expected).max() <= 3  # a 256-level table


# -- in a browser ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium); scripts/test.sh installs it")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; it is in the test extra)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable)
        yield chromium
        chromium.close()


class Watched:
    """A browser page that records console errors, page errors and dialogs (an alert would be a script injected)."""

    def __init__(self, browser) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.errors.append(f"dialog: {d.message}"), d.dismiss()))

    def open(self, path: Path) -> None:
        self.page.goto(path.resolve().as_uri(), wait_until="load")

    def images_decoded(self) -> list[bool]:
        return self.page.eval_on_selector_all("img", "all => all.map(i => i.complete && i.naturalWidth > 0)")

    def column(self, table: str, index: int) -> list[str]:
        script = f"rows => rows.map(r => r.cells[{index}].getAttribute('data-v') ?? r.cells[{index}].textContent)"
        return self.page.eval_on_selector_all(f"#{table} tbody tr", script)

    def header(self, table: str, label: str) -> int:
        labels = self.page.eval_on_selector_all(f"#{table} thead th", "all => all.map(h => h.textContent.trim())")
        return labels.index(label)


@pytest.mark.browser
def test_the_report_in_a_browser(planted, browser) -> None:
    analysis, cue_ids = planted
    view = Watched(browser)
    view.open(analysis.output_dir / "report.html")
    assert view.page.title() == "Strategy analysis"
    assert view.page.inner_text("#classes tbody tr:first-child td:nth-child(2)") == "class 2"
    assert all(view.images_decoded())

    rank = view.header("classes", "rank")
    view.page.click(f"#classes thead th:nth-child({rank + 1})")  # shown sorted by rank: the first click reverses
    assert view.column("classes", rank) == [str(r) for r in range(6, 0, -1)]
    area = view.header("classes", "mask area")
    before = view.column("classes", area)
    view.page.click(f"#classes thead th:nth-child({area + 1})")
    ascending = [float(v) for v in view.column("classes", area)]
    assert ascending == sorted(float(v) for v in before) and ascending != [float(v) for v in before]
    view.page.click(f"#classes thead th:nth-child({area + 1})")
    assert [float(v) for v in view.column("classes", area)] == sorted(ascending, reverse=True)
    name = view.header("classes", "class")
    view.page.click(f"#classes thead th:nth-child({name + 1})")
    assert view.column("classes", name) == [f"class {k}" for k in range(6)]
    view.page.click(f"#classes thead th:nth-child({rank + 1})")
    assert view.column("classes", rank) == [str(r) for r in range(1, 7)]

    view.page.click("#classes a[href='classes/2.html']")
    view.page.wait_for_load_state("load")
    assert view.page.url.endswith("/classes/2.html")
    cluster = planted_cluster(analysis, cue_ids)
    for sample_id in cluster["exemplars"]:
        decoded = view.page.eval_on_selector(f"#s{sample_id} img", "i => i.complete && i.naturalWidth > 0")
        assert decoded, sample_id
    assert all(view.images_decoded())
    assert view.page.locator("svg circle").count() == 30
    view.page.click("a[href='../report.html']")
    view.page.wait_for_load_state("load")
    assert view.page.url.endswith("/report.html")
    assert view.errors == []


@pytest.mark.browser
def test_hostile_names_render_as_text_in_a_browser(hostile, browser) -> None:
    analysis, _, outside = hostile
    view = Watched(browser)
    for path in pages(analysis):
        view.open(path)
        assert view.page.locator("img[src='x']").count() == 0 and view.page.locator("script").count() == 1
        assert all(view.images_decoded())
    view.open(analysis.output_dir / "report.html")
    names = view.page.eval_on_selector_all("#classes tbody td:nth-child(2)", "all => all.map(c => c.textContent)")
    assert sorted(names) == sorted([SCRIPT_NAME, IMG_NAME])
    view.open(analysis.output_dir / "classes" / "1.html")
    assert view.page.inner_text("h1").startswith(IMG_NAME)
    target = view.page.eval_on_selector("a.source", "a => decodeURIComponent(new URL(a.href).pathname)")
    assert target == str(outside / f"{IMG_NAME}.png")
    view.open(analysis.output_dir / "classes" / "0.html")
    overlay_link = view.page.eval_on_selector("figure a", "a => decodeURIComponent(new URL(a.href).pathname)")
    assert Path(overlay_link).is_file() and Path(overlay_link).parent == analysis.root / "overlays"
    assert view.errors == []


@pytest.mark.browser
def test_a_report_of_1000_classes_opens(tmp_path, browser) -> None:
    """Many classes of few small masks: every class listed, every image decoded, the index without per-sample
    data (its load time is measured by benchmarks/analysis_scale.py --browser, not asserted here)."""
    classes = 1000
    write_synthetic_store(tmp_path, classes=classes, per_class=6, size=16, planted={3: ("corner", 0.5)})
    analysis = analyze(tmp_path, layout="spectral", neighbours=3)
    index = analysis.output_dir / "report.html"
    assert index.stat().st_size < 2000 * classes + 300_000
    view = Watched(browser)
    view.open(index)
    assert view.page.locator("#classes tbody tr").count() == classes
    assert all(view.images_decoded())
    top = analysis.classes[0]["target"]
    view.open(analysis.output_dir / "classes" / f"{top}.html")
    assert all(view.images_decoded())
    assert view.errors == []
