"""Explain the built-in demo photos (EfficientNet-Lite0, 224 px) and report, per photo: the mask's area,
whether the soft-masked image keeps the class (``preserved``) and whether the mask thresholded at 0.5 alone,
black elsewhere, keeps it (``selection``); writes the panels (photo | heat map | photo x mask) as one image.

    python benchmarks/photo_check.py --ids 0,1,5,3 --steps 150 --out docs/demo_overlay.jpg
    python benchmarks/photo_check.py --preset default --set mask_coarse=0 --out /tmp/single_scale.png

Photo ids: 0 chelsea (cat), 1 coffee, 2 astronaut, 3 rocket, 4 china.jpg, 5 flower.jpg.
"""

import argparse
import time

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
p.add_argument("--steps", type=int, default=150)
p.add_argument("--preset", default="default")
p.add_argument("--set", nargs="*", default=[], help="settings overrides key=value")
p.add_argument("--out", default="photo_check.png", help="panels; .jpg is written as JPEG (quality 90)")
a = p.parse_args()
torch.manual_seed(0)
ds = DemoDataModule(image_size=224)._build_dataset()
ids = [int(i) for i in a.ids.split(",")]
imgs = torch.stack([ds[i]["image"] for i in ids])
clf = EfficientNetLite0()
nm = NeuroMask(clf, preset=a.preset, steps=a.steps, settings=parse_overrides(a.set))
t = time.time()
ex = nm.explain(imgs, ids=torch.tensor(ids))
dt = time.time() - t
sel = selection(clf, imgs, ex.masks[:, 0], ex.targets)
names = clf.class_names
for j, i in enumerate(ids):
    print(
        f"id {i} {names[int(ex.targets[j])][:14]:14s} area {ex.mask_area[j]:.3f} "
        f"area>0.5 {(ex.masks[j] > 0.5).float().mean():.3f} preserved {bool(ex.preserved[j])} "
        f"p {ex.prob_masked[j]:.2f}/{ex.prob_original[j]:.2f} selection {bool(sel[j])}"
    )
print(
    f"time {dt:.0f}s  mean area {ex.mask_area.mean():.3f} preserved {ex.preserved.float().mean():.2f} "
    f"selection {sel.float().mean():.2f}"
)
panel = torch.cat([explanation_panel(imgs[j], ex.masks[j]) for j in range(len(ids))], dim=1)
if a.out.lower().endswith((".jpg", ".jpeg")):
    Image.fromarray(to_uint8(panel)).save(a.out, quality=90)
else:
    save_png(panel, a.out)
