"""The analysis at ImageNet-val size: 50,000 generated masks of 1,000 classes (two classes with a planted cue),
analysed by ``neuromask_pl.analyze`` in a child process that imports no torch, timed, with its peak memory.

    python benchmarks/analysis_scale.py                     # 1,000 classes x 50 masks of 64 x 64
    python benchmarks/analysis_scale.py --classes 100 --size 224 --out docs/results/analysis_scale.json

Prints the time of each stage and the peak resident memory of the analysing process (``ru_maxrss``); targets:
<= 5 min and <= 4 GB on a 2-core CPU. With ``--browser``, also opens ``report.html`` in chromium (playwright) and
prints its load time (target <= 3 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from neuromask_pl.analysis import analyze
start = time.perf_counter()
analysis = analyze(sys.argv[1], layout=sys.argv[2], report=sys.argv[3] == "1")
seconds = time.perf_counter() - start
print(json.dumps({
    "seconds": seconds,
    "analysis_seconds": analysis.seconds,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "torch_imported": "torch" in sys.modules,
    "samples": len(analysis.table),
    "classes": len(analysis.classes),
    "clusters": len(analysis.clusters),
    "top": [{k: c[k] for k in ("target", "cluster", "size", "suspicion")} for c in analysis.clusters[:5]],
}))
"""


def browser_load_seconds(report: Path) -> float | None:
    """Seconds from navigation to the load event of ``report`` in Debian's chromium, None without one."""
    import shutil

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if exe is None:
        return None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page()
        start = time.perf_counter()
        page.goto(report.resolve().as_uri(), wait_until="load")
        seconds = time.perf_counter() - start
        browser.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="mask side in pixels")
    parser.add_argument("--layout", default="auto", help="auto (t-SNE without umap-learn), tsne, umap or spectral")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--browser", action="store_true", help="time report.html's load in chromium")
    parser.add_argument("--keep", help="write the store here (default: a temporary folder, removed)")
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()

    from neuromask_pl.analysis.synthetic import write_synthetic_store

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp) / "store"
        start = time.perf_counter()
        planted = {7: ("frame", 0.2), 500: ("corner", 0.2)}
        write_synthetic_store(root, args.classes, args.per_class, args.size, planted=planted, seed=0)
        written = time.perf_counter() - start
        env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(root), args.layout, "0" if args.no_report else "1"],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        if child.returncode != 0:
            sys.exit(f"the analysis failed:\n{child.stderr}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        report = root / "analysis" / "report.html"
        if report.is_file():
            result["report_mb"] = round(report.stat().st_size / 2**20, 2)
            result["class_pages_mb"] = round(
                sum(p.stat().st_size for p in (root / "analysis" / "classes").glob("*.html")) / 2**20, 1
            )
        if args.browser and report.is_file():
            result["browser_load_seconds"] = browser_load_seconds(report)
    result.update(
        masks=args.classes * args.per_class,
        mask_size=args.size,
        layout=args.layout,
        store_written_seconds=round(written, 1),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        command="python benchmarks/analysis_scale.py " + " ".join(sys.argv[1:]),
        targets={"seconds": 300, "peak_rss_mb": 4096, "browser_load_seconds": 3},
    )
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
