#!/usr/bin/env python
"""How far the golden masks (tests/test_golden_masks.py) move with the CPU's kernels: the bounds that test uses off
the recording machine.

It computes the masks in subprocesses under this machine's own kernels and under AVX2 and SSE4.1 kernels of ATen,
oneDNN and MKL together (the variables that cap each library's instruction set), and compares every pair of those
and the saved masks (recorded on another machine): mean and largest |difference|, the largest difference of an
image's mask area, and the share of pixels on which the masks disagree at 0.5.

Example::

    python benchmarks/golden_across_cpus.py --out docs/results/golden_across_cpus.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from itertools import combinations
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KERNELS = {
    "this machine": {},
    "AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "SSE4.1": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
CHILD = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_golden_masks import golden_masks
torch.save(golden_masks(), {out!r})
"""


def masks_under(env: dict[str, str], out: Path) -> dict[str, torch.Tensor]:
    code = CHILD.format(tests=str(REPO / "tests"), out=str(out))
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, check=True, cwd=REPO)
    return torch.load(out, weights_only=True)


def compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float, float]:
    gap = (a - b).abs()
    area = (a.flatten(1).mean(1) - b.flatten(1).mean(1)).abs().max()
    return float(gap.mean()), float(gap.max()), float(area), float(((a > 0.5) != (b > 0.5)).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    saved = torch.load(REPO / "tests" / "data" / "golden_masks.pt", weights_only=True)
    runs = {"saved": {k: v for k, v in saved.items() if k != "machine"}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, env in KERNELS.items():
            runs[name] = masks_under(env, Path(tmp) / "masks.pt")
    lines = [
        f"Golden masks across CPU kernels (saved on {saved['machine']}); torch {torch.__version__}",
        "",
        "| preset | runs | mean abs difference | largest abs difference | largest area difference | pixels disagreeing at 0.5 |",  # noqa: E501
        "|---|---|---:|---:|---:|---:|",
    ]
    for preset in runs["saved"]:
        for a, b in combinations(runs, 2):
            mean, largest, area, disagree = compare(runs[a][preset], runs[b][preset])
            lines.append(f"| {preset} | {a} vs {b} | {mean:.3g} | {largest:.3g} | {area:.3g} | {disagree:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
