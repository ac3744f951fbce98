"""``neuromask-pl analyze RUN_DIR``: the strategies of a classifier from a finished (or partly finished) job."""

from __future__ import annotations

import argparse
import csv
import sys
import warnings
from pathlib import Path

from neuromask_pl.analysis.analyze import LAYOUTS, SUSPICIOUS, analyze
from neuromask_pl.analysis.spray import DISTINCT, SEPARATED

DESCRIPTION = (
    "Find what a classifier relies on, class by class: Spectral Relevance Analysis (SpRAy) of the masks of a job. "
    "Per class, the masks are averaged to a grid, clustered on a nearest-neighbour graph (the number of strategies "
    "from the eigengap), laid out in 2-D, and each cluster gets a shortcut suspicion score (small, tight, looking "
    "where the rest of its class does not). Writes strategies.csv, clusters.csv, classes.csv, summary.json, "
    "means.npz and report.html (open it in a browser) into RUN_DIR's store, under analysis/."
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuromask-pl analyze", description=DESCRIPTION)
    p.add_argument(
        "run_dir", help="a job's output: a run folder (lightning_logs/version_N) or its store (explanations/)"
    )
    p.add_argument("--output-dir", help="where to write (default: <store>/analysis)")
    p.add_argument("--grid", type=int, default=16, help="side of the grid masks are averaged to (default 16)")
    p.add_argument(
        "--neighbours", type=int, help="neighbours per mask in the graph (default: sqrt of the class's size, 3 to 10)"
    )
    p.add_argument("--k", type=int, help="strategies per class (default: from the eigengap)")
    p.add_argument("--max-clusters", type=int, default=8, help="most strategies per class the eigengap may find")
    p.add_argument("--min-gap", type=float, default=0.05, help="the smallest eigengap that splits a class")
    p.add_argument("--separated", type=float, default=SEPARATED, help="how near 0 the k-th eigenvalue must be for k")
    p.add_argument(
        "--distinct", type=float, default=DISTINCT, help="share of a cluster's mass in cells of its own for it to stand"
    )
    p.add_argument("--layout", choices=LAYOUTS, default="auto", help="2-D layout (auto: UMAP if installed, else t-SNE)")
    p.add_argument("--exemplars", type=int, default=8, help="images shown per cluster (closest to its centre)")
    p.add_argument("--boxes", help="a CSV of object boxes in mask pixels (sample_id,x0,y0,x1,y1): mask mass off them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument(
        "--tensorboard",
        nargs="?",
        const=True,
        default=False,
        metavar="LOG_DIR",
        help="also write to TensorBoard (the projector, mean masks, statistics): into the run's own log folder, or "
        "LOG_DIR",
    )  # fmt: skip
    return p


def read_boxes(path: str | Path) -> dict[int, tuple[int, int, int, int]]:
    """Boxes ``{sample_id: (x0, y0, x1, y1)}`` from a CSV with those columns (mask pixels, x1/y1 exclusive)."""
    boxes: dict[int, tuple[int, int, int, int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        needed = {"sample_id", "x0", "y0", "x1", "y1"}
        if not needed <= set(reader.fieldnames or ()):
            raise ValueError(
                f"{path}: the boxes need the columns {', '.join(sorted(needed))}, it has {reader.fieldnames}"
            )
        for line, row in enumerate(reader, 2):
            try:
                boxes[int(row["sample_id"])] = tuple(int(float(row[k])) for k in ("x0", "y0", "x1", "y1"))  # type: ignore[assignment]
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {line}: sample_id, x0, y0, x1, y1 must be numbers, got {row}") from None
    return boxes


def main(args: list[str] | None = None) -> int:
    """Run the analysis from the command line; prints where the results are and the most suspicious clusters."""
    ns = parser().parse_args(args)
    truth = None
    if ns.boxes:
        boxes = read_boxes(ns.boxes)
        truth = lambda sample_id, row: boxes.get(int(sample_id))  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analysis = analyze(
            ns.run_dir,
            grid=ns.grid,
            neighbours=ns.neighbours,
            k=ns.k,
            max_clusters=ns.max_clusters,
            min_gap=ns.min_gap,
            separated=ns.separated,
            distinct=ns.distinct,
            layout=ns.layout,
            exemplars=ns.exemplars,
            truth=truth,
            seed=ns.seed,
            output_dir=ns.output_dir,
            report=not ns.no_report,
            tensorboard=ns.tensorboard,
        )
    for warning in caught:
        print(f"neuromask-pl analyze: warning: {warning.message}", file=sys.stderr)
    out = analysis.output_dir
    print(
        f"neuromask-pl analyze: {len(analysis.table)} masks of {len(analysis.classes)} classes "
        f"in {analysis.seconds:.1f} s"
    )
    print(f"  results: {out}")
    if not ns.no_report:
        print(f"  report:  {out / 'report.html'}")
    suspicious = analysis.suspicious()
    print(f"  {len(suspicious)} cluster(s) with shortcut suspicion >= {SUSPICIOUS}" + (":" if suspicious else ""))
    for c in suspicious[:10]:
        examples = " ".join(str(int(i)) for i in c["exemplars"][:5])
        print(
            f"    {c['rank']:>3}. class {c['target_name']!s} cluster {c['cluster']}: {c['size']} images "
            f"({c['share']:.0%} of the class), suspicion {c['suspicion']:.2f}, "
            f"mass on the border {c['mass_border']:.0%}, in the corners {c['mass_corners']:.0%}; "
            f"e.g. samples {examples}"
        )
    return 0
