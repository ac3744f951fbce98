"""Explain the built-in demo photos (EfficientNet-Lite0, 224 px) and report, per photo: the mask's area,
whether the soft-masked image keeps the class (``preserved``) and whether the mask thresholded at 0.5 alone,
black elsewhere, keeps it (``selection``); writes the panels (photo | heat map | photo x mask) as one image.

    python benchmarks/photo_check.py --ids 0,1,5,3 --out docs/demo_overlay.jpg
    python benchmarks/photo_check.py --preset default --set mask_coarse=0 --out /tmp/single_scale.png

With ``--stability alone,plain,avx2,seed`` (or ``all``) it also reports the IoU of the thresholded masks with
each image alone, the plain path, another machine's kernels and another seed (``benchmarks/stability.py``), and
always the 8-connected pieces of each thresholded mask.

Photo ids: 0 chelsea (cat), 1 coffee, 2 astronaut, 3 rocket, 4 china.jpg, 5 flower.jpg.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from neuromask_pl import NeuroMask
from neuromask_pl.classifiers import EfficientNetLite0
from neuromask_pl.data import DemoDataModule
from neuromask_pl.metrics import selection
from neuromask_pl.settings import parse_overrides
from neuromask_pl.viz import explanation_panel, save_png, to_uint8

p = argparse.ArgumentParser()
p.add_argument("--ids", default="0,1,5,3")
p.add_argument("--steps", type=int, default=300, help="as the default preset and configs/demo.yaml")
p.add_argument("--preset", default="default")
p.add_argument("--set", nargs="*", default=[], help="settings overrides key=value")
p.add_argument("--out", default="photo_check.png", help="panels; .jpg is written as JPEG (quality 90); '' = none")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--stability", default=None, help="comma list of alone,plain,avx2,seed or 'all'")
p.add_argument("--dump-maps", default=None, help="save the masks to this .pt file")
a = p.parse_args()
torch.manual_seed(0)
ds = DemoDataModule(image_size=224)._build_dataset()
ids = [int(i) for i in a.ids.split(",")]
imgs = torch.stack([ds[i]["image"] for i in ids])
clf = EfficientNetLite0()
sys.path.insert(0, str(Path(__file__).resolve().parent))
import stability  # noqa: E402

nm = NeuroMask(clf, preset=a.preset, steps=a.steps, settings=parse_overrides(a.set), seed=a.seed)
t = time.time()
ex = nm.explain(imgs, ids=torch.tensor(ids))
dt = time.time() - t
sel = selection(clf, imgs, ex.masks[:, 0], ex.targets)
pieces = stability.count_pieces(ex.masks > stability.THRESHOLD)
names = clf.class_names
for j, i in enumerate(ids):
    print(
        f"id {i} {names[int(ex.targets[j])][:14]:14s} area {ex.mask_area[j]:.3f} "
        f"area>0.5 {(ex.masks[j] > 0.5).float().mean():.3f} preserved {bool(ex.preserved[j])} "
        f"p {ex.prob_masked[j]:.2f}/{ex.prob_original[j]:.2f} selection {bool(sel[j])} pieces {int(pieces[j])}"
    )
print(
    f"time {dt:.0f}s  mean area {ex.mask_area.mean():.3f} preserved {ex.preserved.float().mean():.2f} "
    f"selection {sel.float().mean():.2f} pieces {pieces.float().mean():.2f}"
)
if a.dump_maps:
    torch.save({"neuromask": ex.masks}, a.dump_maps)


def remake(variant):
    """The masks under a stability variant (benchmarks/stability.py)."""
    if variant == "avx2":
        rest = stability.argv_without(sys.argv[1:], {"--stability", "--out", "--dump-maps"})
        return stability.maps_in_subprocess(__file__, rest + ["--out", ""], stability.AVX2_ENV)["neuromask"]
    path = stability.PLAIN_PATH if variant == "plain" else {}
    seed = a.seed + (variant == "seed")
    other = NeuroMask(clf, a.preset, a.steps, parse_overrides(a.set), seed=seed, **path)
    if variant == "alone":
        return torch.cat([other.explain(imgs[j : j + 1], ids=torch.tensor([i])).masks for j, i in enumerate(ids)])
    return other.explain(imgs, ids=torch.tensor(ids)).masks


if a.stability:
    variants = stability.parse_variants(a.stability)
    keep = lambda masks: stability.keeps_class(clf, imgs, masks, ex.targets)  # noqa: E731
    result = stability.stability_of(f"neuromask:{a.preset}", ex.masks, True, remake, variants, None, keep)
    print(stability.markdown_table([result], variants))
    for variant in variants:
        print(variant, "IoU per photo", result[variant]["iou"])
if not a.out:
    sys.exit(0)
panel = torch.cat([explanation_panel(imgs[j], ex.masks[j]) for j in range(len(ids))], dim=1)
if a.out.lower().endswith((".jpg", ".jpeg")):
    Image.fromarray(to_uint8(panel)).save(a.out, quality=90)
else:
    save_png(panel, a.out)
