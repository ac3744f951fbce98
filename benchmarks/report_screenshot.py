"""A screenshot of the analysis report for the README: the page of the most suspicious class, as Debian's chromium
shows it (through playwright; no browser download).

    python benchmarks/report_screenshot.py                          # a synthetic store with planted cues
    python benchmarks/report_screenshot.py lightning_logs/version_0 # any store (or run folder)
    python benchmarks/report_screenshot.py --out /tmp/report.png --width 1280 --height 1000

The analysis and its report go to a temporary folder (a given store is only read). The PNG is reduced to 256
colours when it would be over ``--max-kb`` (default 300).
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

from neuromask_pl.analysis import analyze
from neuromask_pl.analysis.synthetic import write_synthetic_store

REPO = Path(__file__).resolve().parents[1]


def synthetic_store(root: Path) -> Path:
    """8 classes of 40 masks (64 x 64); a frame in 30 % of class 3's, a corner mark in 25 % of class 5's."""
    write_synthetic_store(root, classes=8, per_class=40, size=64, planted={3: ("frame", 0.3), 5: ("corner", 0.25)})
    return root


def screenshot(page_file: Path, out: Path, width: int, height: int, max_kb: int) -> int:
    """Save a ``width x height`` screenshot of ``page_file`` to ``out``; returns its size in bytes."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        sys.exit("no chromium on PATH (Debian: apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(page_file.resolve().as_uri(), wait_until="load")
        png = page.screenshot(full_page=False)
        browser.close()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    if buffer.tell() > max_kb * 1024:
        buffer = io.BytesIO()
        image.quantize(256, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    return buffer.tell()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", nargs="?", help="a store or run folder (default: a synthetic store)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "analysis_report.png")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--max-kb", type=int, default=300)
    parser.add_argument("--layout", default="tsne", help="the analysis's layout (auto, tsne, umap, spectral)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.store) if args.store else synthetic_store(Path(tmp) / "store")
        analysis = analyze(store, layout=args.layout, output_dir=Path(tmp) / "analysis")
        top = analysis.classes[0]
        page_file = analysis.output_dir / "classes" / f"{top['target']}.html"
        size = screenshot(page_file, args.out, args.width, args.height, args.max_kb)
    print(
        f"{args.out}: the page of class {top['target_name']!r} (suspicion {top['suspicion']:.2f}), {size / 1024:.0f} KB"
    )


if __name__ == "__main__":
    main()
