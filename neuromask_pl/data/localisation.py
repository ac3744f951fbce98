"""A localisation benchmark with known ground truth, built from real handwritten digits.

Each image is one of scikit-learn's 1797 real handwritten digits (8 x 8, values 0..16; BSD
licence, bundled offline), upsampled (bilinear) to ``digit_size`` and placed at a random position
on a larger RGB canvas among clutter that carries no label information. The ground truth says
where the evidence is:

- ``gt_mask``: the digit's bounding box, the tight box around its visible ink (digit pixels with
  opacity >= :data:`INK_THRESHOLD`). A box, as in the pointing game of Zhang et al. (2016) and
  the energy-based pointing game of Score-CAM (Wang et al., 2020).
- ``digit_mask``: the ink itself (the stroke support, same threshold), always inside ``gt_mask``.
- ``box``: ``gt_mask`` as ``x0, y0, x1, y1`` (pixel indices, ``x1``/``y1`` exclusive).

Clutter: 5 to 9 random strokes (straight lines, bent polylines, arcs) and soft blobs, each in a
12 to 22 pixel patch, drawn with stroke widths, opacities and colours like the digit's (every object
has a random colour; the background is a random dark colour, with mild noise). No clutter comes
within :data:`CLEAR_MARGIN` pixels of the digit's square (nor touches the cue), so the ground truth
holds only the digit; an object with no room left is not drawn. Clutter comes from its own random stream, drawn the same
way whatever the digit is: it is independent of the label.

Spurious variant (``spurious=True``): a ``cue_size`` x ``cue_size`` square whose colour (one of
the ten in :data:`CUE_COLOURS`) encodes ``cue_label``, placed at random clear of the digit, and a
fainter digit (opacity :data:`SPURIOUS_DIGIT_CONTRAST`) so that a classifier trained on it takes the
shortcut. In the train and val splits ``cue_label == label`` (perfectly correlated); in the test
split ``cue_label`` is drawn independently of the label (``cue="independent"``), so an image
classified as ``cue_label != label`` is classified by the cue. ``cue="agree"`` on the test split
gives the correlated version (to measure accuracy when the cue tells the truth).

Planted variant (``planted=True``): clean digits at full contrast, and in a share
(:data:`PLANTED_SHARE`, 30 %) of the images of one class a cue that no other class ever carries, the
shortcuts a dataset-level analysis should find: a white frame (:data:`FRAME_WIDTH` pixels along every
edge) on class 3 and a white :data:`CORNER_SIZE` x :data:`CORNER_SIZE` square near the top-left
corner on class 7 (:data:`PLANTED_CUES`). White is outside the law of the digits' and the clutter's colours. In every
planted image, with a cue or not, the digit and the clutter keep off the frame's band and the
corner (with :data:`CLEAR_MARGIN`), so a cue changes nothing but its own pixels. Each sample says
which cue it carries (``cue``: a name or None; ``cue_mask``: its pixels). :func:`make_cue_alone_set`
gives the same scenes without the digit, with a chosen cue (or none): what the classifier says of
the cue alone. ``planted_spread`` keeps the digit within a few pixels of the centre: a test set where
the digit's position is no strategy of its own (the shipped classifier saw digits anywhere).

The 1797 digits are split once, with a fixed seed and per class, into disjoint train / val / test
pools (:func:`digit_pools`): test images only show digits never seen in training. Every image is
generated from ``(seed, split, variant, image number)`` alone, so a set of ``n`` images is the
first ``n`` of any larger set with the same arguments.
"""

from __future__ import annotations

import colorsys
import functools
import importlib.resources
import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from neuromask_pl.data.batch import collate_samples
from neuromask_pl.data.modules import ExplainDataModule

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
VARIANTS = ("clean", "spurious", "planted")
CLASS_NAMES = [str(d) for d in range(10)]
#: Fraction of each class's digits in the train, val and test pools.
POOL_FRACTIONS = (0.6, 0.15, 0.25)
#: Seed of the pool split; fixed, so that no ``seed`` argument can mix test digits into training.
POOL_SEED = 20190611
#: Digit pixels at least this opaque (0..1) are ink.
INK_THRESHOLD = 0.1
#: Clutter and the cue keep this many pixels away from the digit's square.
CLEAR_MARGIN = 2
#: Opacity of the digit in the spurious variant (1.0 in the clean one).
SPURIOUS_DIGIT_CONTRAST = 0.3
#: RGB colour of the cue for each class: red, green, blue, yellow, cyan, magenta, white, orange,
#: purple, grey.
CUE_COLOURS = (
    (1.0, 0.0, 0.0),
    (0.0, 0.8, 0.0),
    (0.0, 0.2, 1.0),
    (1.0, 1.0, 0.0),
    (0.0, 1.0, 1.0),
    (1.0, 0.0, 1.0),
    (1.0, 1.0, 1.0),
    (1.0, 0.5, 0.0),
    (0.5, 0.0, 0.8),
    (0.5, 0.5, 0.5),
)
#: The planted variant's cues: name -> the class whose images may carry it (no other class ever does).
PLANTED_CUES = {"frame": 3, "corner": 7}
#: Share of the cue class's images that carry its cue in the planted variant (every split alike).
PLANTED_SHARE = 0.3
#: Width in pixels of the planted frame along each edge of the image.
FRAME_WIDTH = 2
#: Side of the planted corner mark and its distance from the image's top and left edges.
CORNER_SIZE = 8
CORNER_OFFSET = FRAME_WIDTH + 1
#: Colour of the planted cues: white, which no digit or clutter object takes (their saturation is >= 0.4).
PLANTED_CUE_COLOUR = (1.0, 1.0, 1.0)
_ASSETS = "assets"


# --------------------------------------------------------------------------- digits and pools


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (1797, 8, 8) float32 in [0, 1] and their labels (1797,)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            f"the localisation benchmark needs scikit-learn's digits ({err}); install it with "
            "pip install 'neuromask-pl[demo]'"
        ) from err
    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def digit_pools() -> dict[str, np.ndarray]:
    """Disjoint pools of digit indices (into scikit-learn's 1797 digits) for train, val and test.

    Split per class (so every pool has every class in proportion) with the fixed :data:`POOL_SEED`.
    """
    _, labels = _digits()
    rng = np.random.default_rng(POOL_SEED)
    pools: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for cls in range(10):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_train = round(POOL_FRACTIONS[0] * len(members))
        n_val = round(POOL_FRACTIONS[1] * len(members))
        parts = np.split(members, [n_train, n_train + n_val])
        for split, part in zip(SPLITS, parts):
            pools[split].append(part)
    return {s: np.sort(np.concatenate(p)) for s, p in pools.items()}


@functools.lru_cache(maxsize=4)
def _upsampled_digits(digit_size: int) -> np.ndarray:
    """All digits upsampled (bilinear) to digit_size x digit_size, float32 opacities in [0, 1]."""
    images, _ = _digits()
    up = F.interpolate(torch.from_numpy(images)[:, None], size=(digit_size, digit_size), mode="bilinear")
    return up[:, 0].clamp(0, 1).numpy()


# --------------------------------------------------------------------------- drawing


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random saturated, bright RGB colour (the same law for digits and clutter)."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.4, 1.0), rng.uniform(0.7, 1.0))
    return np.array(rgb, dtype=np.float32)


def _segments_alpha(points: np.ndarray, radius: float, size: int) -> np.ndarray:
    """Opacity (size x size) of a polyline through ``points`` (k x 2, x/y) with half-width ``radius``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dist = np.full((size, size), np.inf, dtype=np.float32)
    for (ax, ay), (bx, by) in zip(points[:-1], points[1:]):
        dx, dy = bx - ax, by - ay
        length2 = dx * dx + dy * dy
        t = np.clip(((xx - ax) * dx + (yy - ay) * dy) / max(length2, 1e-6), 0.0, 1.0)
        dist = np.minimum(dist, np.hypot(xx - (ax + t * dx), yy - (ay + t * dy)))
    return np.clip(radius + 0.5 - dist, 0.0, 1.0)


def _clutter_patch(rng: np.random.Generator, size: int) -> np.ndarray:
    """One clutter object's opacity in a size x size patch: a line, a bent stroke, an arc or a blob."""
    kind = rng.integers(4)
    radius = rng.uniform(1.2, 2.5)
    lo, hi = radius + 0.5, size - radius - 0.5
    if kind == 0:  # straight line
        points = rng.uniform(lo, hi, size=(2, 2))
    elif kind == 1:  # bent stroke: 3 or 4 points
        points = rng.uniform(lo, hi, size=(int(rng.integers(3, 5)), 2))
    elif kind == 2:  # arc of a circle, 90 to 200 degrees, as a polyline
        r = rng.uniform(0.3, 0.5) * (hi - lo)
        start, span = rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(90, 200))
        angles = start + np.linspace(0.0, span, 7)
        centre = (lo + hi) / 2
        points = np.stack([centre + r * np.cos(angles), centre + r * np.sin(angles)], axis=1)
    else:  # soft blob
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        cx, cy = rng.uniform(size * 0.3, size * 0.7, size=2)
        sx, sy = rng.uniform(1.5, size / 5, size=2)
        return np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2)).astype(np.float32)
    return _segments_alpha(points.astype(np.float32), radius, size)


def _place(
    rng: np.random.Generator, w: int, h: int, canvas: int, avoid: list[tuple[int, int, int, int]]
) -> tuple[int, int, int, int] | None:
    """A w x h box drawn uniformly among those on the canvas that intersect none of ``avoid`` (None if none)."""
    xs, ys = np.arange(canvas - w + 1), np.arange(canvas - h + 1)
    free = np.ones((len(ys), len(xs)), dtype=bool)
    for ax0, ay0, ax1, ay1 in avoid:
        free &= ~(((ys < ay1) & (ys + h > ay0))[:, None] & ((xs < ax1) & (xs + w > ax0))[None, :])
    candidates = np.flatnonzero(free)
    if candidates.size == 0:
        return None
    y0, x0 = divmod(int(candidates[rng.integers(candidates.size)]), len(xs))
    return (x0, y0, x0 + w, y0 + h)


def _over(image: np.ndarray, colour: np.ndarray, alpha: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """Composite ``colour`` with opacity ``alpha`` over ``image`` (3 x H x W) inside ``box``, in place."""
    x0, y0, x1, y1 = box
    region = image[:, y0:y1, x0:x1]
    region *= 1.0 - alpha
    region += colour[:, None, None] * alpha


def _render(
    index: int,
    split: str,
    canvas: int,
    digit_size: int,
    seed: int,
    spurious: bool,
    cue: str,
    cue_size: int,
    pool: np.ndarray,
) -> dict[str, Any]:
    """Render image ``index`` of a set; all randomness comes from (seed, split, variant, index)."""
    entropy = [seed, SPLITS.index(split), int(spurious), index]
    digit_rng, place_rng, clutter_rng, cue_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(entropy).spawn(4)
    )
    digit_index = int(pool[digit_rng.integers(len(pool))])
    label = int(_digits()[1][digit_index])
    contrast = SPURIOUS_DIGIT_CONTRAST if spurious else 1.0
    digit_alpha = _upsampled_digits(digit_size)[digit_index] * contrast
    digit_colour = _random_colour(digit_rng)

    x0, y0 = (int(v) for v in place_rng.integers(0, canvas - digit_size + 1, size=2))
    square = (x0, y0, x0 + digit_size, y0 + digit_size)
    clear = (x0 - CLEAR_MARGIN, y0 - CLEAR_MARGIN, x0 + digit_size + CLEAR_MARGIN, y0 + digit_size + CLEAR_MARGIN)

    image = np.empty((3, canvas, canvas), dtype=np.float32)
    image[:] = place_rng.uniform(0.0, 0.15, size=(3, 1, 1))
    avoid = [clear]
    sample: dict[str, Any] = {}
    if spurious:
        cue_label = label if cue == "agree" else int(cue_rng.integers(10))
        cue_box = _place(cue_rng, cue_size, cue_size, canvas, avoid)
        assert cue_box is not None  # guaranteed by the size check in _check_args
        avoid.append((cue_box[0] - 1, cue_box[1] - 1, cue_box[2] + 1, cue_box[3] + 1))
        cue_mask = np.zeros((canvas, canvas), dtype=bool)
        cue_mask[cue_box[1] : cue_box[3], cue_box[0] : cue_box[2]] = True
        sample.update(cue_label=cue_label, cue_mask=cue_mask, cue_box=cue_box)

    _draw_clutter(image, clutter_rng, avoid)
    if spurious:
        _over(image, np.array(CUE_COLOURS[sample["cue_label"]], dtype=np.float32), np.float32(1.0), cue_box)
    _over(image, digit_colour, digit_alpha, square)
    image += place_rng.normal(0.0, 0.03, size=image.shape).astype(np.float32)
    np.clip(image, 0.0, 1.0, out=image)

    ink, box, gt = _digit_truth(digit_index, digit_size, x0, y0, canvas)
    sample.update(image=image, label=label, gt_mask=gt, digit_mask=ink, box=box, digit_index=digit_index)
    return sample


def _draw_clutter(image: np.ndarray, rng: np.random.Generator, avoid: list[tuple[int, int, int, int]]) -> None:
    """Draw 5 to 9 clutter objects onto ``image`` (3 x canvas x canvas) from ``rng``, each clear of ``avoid``; an
    object with no room left is not drawn."""
    canvas = image.shape[-1]
    for _ in range(int(rng.integers(5, 10))):
        patch = int(rng.integers(12, 23))
        alpha = _clutter_patch(rng, patch) * rng.uniform(0.6, 1.0)
        colour = _random_colour(rng)
        where = _place(rng, patch, patch, canvas, avoid)
        if where is not None:
            _over(image, colour, alpha, where)


def _digit_truth(
    digit_index: int, digit_size: int, x0: int, y0: int, canvas: int
) -> tuple[np.ndarray, tuple[int, int, int, int], np.ndarray]:
    """The ground truth of a digit drawn at ``(x0, y0)``: its ink, the tight box around it and that box as a mask."""
    ink = np.zeros((canvas, canvas), dtype=bool)
    ink[y0 : y0 + digit_size, x0 : x0 + digit_size] = _upsampled_digits(digit_size)[digit_index] >= INK_THRESHOLD
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    gt = np.zeros((canvas, canvas), dtype=bool)
    gt[box[1] : box[3], box[0] : box[2]] = True
    return ink, box, gt


def planted_cue_mask(cue: str, canvas: int = 64) -> np.ndarray:
    """The pixels (canvas x canvas bool) of a planted cue, ``"frame"`` or ``"corner"``."""
    if cue not in PLANTED_CUES:
        raise ValueError(f"cue must be one of {sorted(PLANTED_CUES)}, got {cue!r}")
    mask = np.zeros((canvas, canvas), dtype=bool)
    if cue == "frame":
        mask[:FRAME_WIDTH] = mask[canvas - FRAME_WIDTH :] = True
        mask[:, :FRAME_WIDTH] = mask[:, canvas - FRAME_WIDTH :] = True
    else:
        mask[CORNER_OFFSET : CORNER_OFFSET + CORNER_SIZE, CORNER_OFFSET : CORNER_OFFSET + CORNER_SIZE] = True
    return mask


def _planted_reserved(canvas: int) -> list[tuple[int, int, int, int]]:
    """Boxes the digit and the clutter of every planted image keep off: the frame's band and the corner, each with
    :data:`CLEAR_MARGIN`."""
    band = FRAME_WIDTH + CLEAR_MARGIN
    corner = CORNER_OFFSET + CORNER_SIZE + CLEAR_MARGIN
    return [
        (0, 0, canvas, band),
        (0, canvas - band, canvas, canvas),
        (0, 0, band, canvas),
        (canvas - band, 0, canvas, canvas),
        (0, 0, corner, corner),
    ]


def _render_planted(
    index: int,
    split: str,
    canvas: int,
    digit_size: int,
    seed: int,
    share: float,
    pool: np.ndarray,
    spread: int | None = None,
    alone: tuple[str | None] | None = None,
) -> dict[str, Any]:
    """Render image ``index`` of the planted variant; all randomness comes from (seed, split, variant, index).

    ``spread``: None places the digit anywhere clear of the cues; an integer within that many pixels (each way) of
    the canvas's centre. ``alone``: None for the image itself; ``(cue,)`` for the same scene without its digit, with
    ``cue`` (a name, or None for no cue) in place of the cue it had.
    """
    entropy = [seed, SPLITS.index(split), VARIANTS.index("planted"), index]
    digit_rng, place_rng, clutter_rng, cue_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(entropy).spawn(4)
    )
    digit_index = int(pool[digit_rng.integers(len(pool))])
    label = int(_digits()[1][digit_index])
    digit_alpha = _upsampled_digits(digit_size)[digit_index]
    digit_colour = _random_colour(digit_rng)

    reserved = _planted_reserved(canvas)
    if spread is None:
        square = _place(place_rng, digit_size, digit_size, canvas, reserved)
        assert square is not None  # guaranteed by the size check in _check_planted
        x0, y0 = square[:2]
    else:
        x0, y0 = ((canvas - digit_size) // 2 + int(v) for v in place_rng.integers(-spread, spread + 1, size=2))
        square = (x0, y0, x0 + digit_size, y0 + digit_size)
    clear = (x0 - CLEAR_MARGIN, y0 - CLEAR_MARGIN, x0 + digit_size + CLEAR_MARGIN, y0 + digit_size + CLEAR_MARGIN)

    image = np.empty((3, canvas, canvas), dtype=np.float32)
    image[:] = place_rng.uniform(0.0, 0.15, size=(3, 1, 1))
    carries = cue_rng.uniform() < share  # drawn for every image, so the streams do not depend on the label
    cue = next((name for name, cls in PLANTED_CUES.items() if cls == label and carries), None)
    if alone is not None:
        (cue,) = alone
    avoid = [clear, *reserved]
    _draw_clutter(image, clutter_rng, avoid)
    cue_mask = planted_cue_mask(cue, canvas) if cue is not None else np.zeros((canvas, canvas), dtype=bool)
    image[:, cue_mask] = np.array(PLANTED_CUE_COLOUR, dtype=np.float32)[:, None]
    if alone is None:
        _over(image, digit_colour, digit_alpha, square)
    image += place_rng.normal(0.0, 0.03, size=image.shape).astype(np.float32)
    np.clip(image, 0.0, 1.0, out=image)

    ink, box, gt = _digit_truth(digit_index, digit_size, x0, y0, canvas)
    if alone is not None:  # no digit: no evidence of it
        ink[:] = gt[:] = False
    return dict(
        image=image,
        label=label,
        gt_mask=gt,
        digit_mask=ink,
        box=box,
        digit_index=digit_index,
        cue=cue,
        cue_index=-1 if cue is None else list(PLANTED_CUES).index(cue),
        cue_mask=cue_mask,
    )


def _stack(
    samples: list[dict[str, Any]], n: int, canvas: int, masks: tuple[str, ...], ints: tuple[str, ...]
) -> dict[str, Any]:
    """The samples' arrays as the tensors of a set: the image, the masks (n x 1 x H x W) and the integers."""
    out: dict[str, Any] = {
        "image": torch.from_numpy(np.stack([s["image"] for s in samples]).reshape(n, 3, canvas, canvas)),
    }
    for key in masks:
        out[key] = torch.from_numpy(np.stack([s[key] for s in samples]).reshape(n, 1, canvas, canvas))
    for key in ints:
        out[key] = torch.tensor([s[key] for s in samples], dtype=torch.long).reshape(n, *([4] if "box" in key else []))
    return out


# --------------------------------------------------------------------------- public API


def _check_args(
    split: str, n: int, canvas: int, digit_size: int, seed: int, spurious: bool, cue: str | None, cue_size: int
) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for name, value, low in (("n", n, 0), ("canvas", canvas, 1), ("digit_size", digit_size, 8), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(cue_size, bool) or not isinstance(cue_size, int) or cue_size < 1:
        raise ValueError(f"cue_size must be a positive integer, got {cue_size!r}")
    # Room for the cue beside the digit's clear square wherever the digit is (clutter that does not fit is left out).
    if (canvas - digit_size - 2 * CLEAR_MARGIN) // 2 < cue_size:
        raise ValueError(
            f"canvas ({canvas}) is too small for digit_size {digit_size} and cue_size {cue_size}: it must be at "
            f"least digit_size + 2 * cue_size + {2 * CLEAR_MARGIN} = {digit_size + 2 * cue_size + 2 * CLEAR_MARGIN}"
        )
    if cue is None:
        cue = "independent" if split == "test" else "agree"
    if cue not in ("agree", "independent"):
        raise ValueError(f"cue must be 'agree', 'independent' or None, got {cue!r}")
    if cue != "agree" and not spurious:
        logger.debug("cue=%r has no effect without spurious=True", cue)
    return cue


def _check_planted(
    split: str, n: int, canvas: int, digit_size: int, seed: int, share: float, spread: int | None
) -> None:
    _check_args(split, n, canvas, digit_size, seed, False, None, 1)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise ValueError(f"planted_share must be a number in [0, 1], got {share!r}")
    band = FRAME_WIDTH + CLEAR_MARGIN
    corner = CORNER_OFFSET + CORNER_SIZE + CLEAR_MARGIN
    if canvas < corner + digit_size + band:  # room for the digit beside the corner, inside the frame's band
        raise ValueError(
            f"canvas ({canvas}) is too small for the planted variant with digit_size {digit_size}: it must be at "
            f"least digit_size + {corner + band} = {digit_size + corner + band}"
        )
    if spread is not None:
        if isinstance(spread, bool) or not isinstance(spread, int) or spread < 0:
            raise ValueError(f"planted_spread must be None or an integer >= 0, got {spread!r}")
        centre = (canvas - digit_size) // 2
        if centre - spread < corner or centre + spread + digit_size > canvas - band:
            raise ValueError(
                f"planted_spread {spread} moves the digit onto the cues' area: at most "
                f"{min(centre - corner, canvas - band - digit_size - centre)} for canvas {canvas} and digit_size "
                f"{digit_size}"
            )


def make_localisation_set(
    split: str,
    n: int,
    canvas: int = 64,
    digit_size: int = 24,
    seed: int = 0,
    spurious: bool = False,
    cue: str | None = None,
    cue_size: int = 6,
    planted: bool = False,
    planted_share: float = PLANTED_SHARE,
    planted_spread: int | None = None,
) -> dict[str, Any]:
    """Generate ``n`` benchmark images with their ground truth (deterministic in all arguments).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``: which disjoint pool of digits to draw from.
        n: number of images.
        canvas: side of the square RGB image.
        digit_size: side the 8 x 8 digit is upsampled to.
        seed: seed of the scenes (digit choice, position, colours, clutter, noise, cue).
        spurious: add the label-coding colour cue and make the digit faint.
        cue: ``"agree"`` (``cue_label == label``) or ``"independent"`` (``cue_label`` uniform,
            independent of the label); default ``"independent"`` for the test split, ``"agree"``
            otherwise. Only used when ``spurious``.
        cue_size: side of the square cue.
        planted: the planted variant (clean digits; the cues of :data:`PLANTED_CUES` on a share of their
            classes' images). Not with ``spurious``.
        planted_share: share of a cue class's images that carry its cue (drawn per image).
        planted_spread: None places the digit anywhere clear of the cues (as the shipped classifier was trained);
            an integer places its square within that many pixels, each way, of the canvas's centre: a test set
            where the digit's position is not a strategy of its own (another set, drawn from the same seeds).

    Returns:
        ``image`` (n, 3, canvas, canvas) float32 in [0, 1]; ``label`` (n,) long; ``gt_mask``
        (n, 1, canvas, canvas) bool, the digit's tight box; ``digit_mask`` (same shape) bool, the
        digit's ink; ``box`` (n, 4) long ``x0, y0, x1, y1`` (ends exclusive); ``digit_index`` (n,)
        long, the digit's index in scikit-learn's digits. With ``spurious``: ``cue_label`` (n,)
        long, ``cue_mask`` (n, 1, canvas, canvas) bool and ``cue_box`` (n, 4) long. With ``planted``:
        ``cue`` (a list of n cue names or None), ``cue_index`` (n,) long (the cue's place in
        :data:`PLANTED_CUES`, -1 for none) and ``cue_mask`` (n, 1, canvas, canvas) bool (all False without a cue).

    Raises:
        ValueError: for an unknown split or cue mode, or sizes that do not fit.
    """
    if planted:
        if spurious:
            raise ValueError("planted and spurious are two variants: choose one")
        _check_planted(split, n, canvas, digit_size, seed, planted_share, planted_spread)
        pool = digit_pools()[split]
        samples = [
            _render_planted(i, split, canvas, digit_size, seed, planted_share, pool, planted_spread) for i in range(n)
        ]
        data = _stack(samples, n, canvas, ("gt_mask", "digit_mask", "cue_mask"), ("label", "digit_index", "box"))
        data["cue_index"] = torch.tensor([s["cue_index"] for s in samples], dtype=torch.long)
        data["cue"] = [s["cue"] for s in samples]
        return data
    cue = _check_args(split, n, canvas, digit_size, seed, spurious, cue, cue_size)
    pool = digit_pools()[split]
    samples = [_render(i, split, canvas, digit_size, seed, spurious, cue, cue_size, pool) for i in range(n)]
    keys = ["label", "digit_index", "box"] + (["cue_label", "cue_box"] if spurious else [])
    out: dict[str, Tensor] = {
        "image": torch.from_numpy(np.stack([s["image"] for s in samples]).reshape(n, 3, canvas, canvas)),
    }
    for key in ("gt_mask", "digit_mask") + (("cue_mask",) if spurious else ()):
        out[key] = torch.from_numpy(np.stack([s[key] for s in samples]).reshape(n, 1, canvas, canvas))
    for key in keys:
        out[key] = torch.tensor([s[key] for s in samples], dtype=torch.long).reshape(n, *([4] if "box" in key else []))
    return out


def make_cue_alone_set(
    split: str,
    n: int,
    cue: str | None,
    canvas: int = 64,
    digit_size: int = 24,
    seed: int = 0,
    planted_spread: int | None = None,
) -> dict[str, Any]:
    """The first ``n`` scenes of the planted variant without their digit, each with ``cue`` (or no cue).

    Image ``i`` is image ``i`` of ``make_localisation_set(split, n, canvas, digit_size, seed, planted=True,
    planted_spread=planted_spread)`` with
    the digit left out (its background, clutter and noise are the same) and ``cue`` drawn instead of the cue it had:
    a classifier that calls these images ``PLANTED_CUES[cue]`` took the shortcut; ``cue=None`` gives the scenes with
    neither digit nor cue (the control).

    Returns:
        ``image`` (n, 3, canvas, canvas) float32; ``label`` (n,) long, the class of the digit left out;
        ``cue_mask`` (n, 1, canvas, canvas) bool; ``cue_index`` (n,) long; ``cue`` (a list of n names or None).
    """
    if cue is not None and cue not in PLANTED_CUES:
        raise ValueError(f"cue must be one of {sorted(PLANTED_CUES)} or None, got {cue!r}")
    _check_planted(split, n, canvas, digit_size, seed, PLANTED_SHARE, planted_spread)
    pool = digit_pools()[split]
    samples = [
        _render_planted(i, split, canvas, digit_size, seed, PLANTED_SHARE, pool, planted_spread, (cue,))
        for i in range(n)
    ]
    out = _stack(samples, n, canvas, ("cue_mask",), ("label", "cue_index"))
    out["cue"] = [s["cue"] for s in samples]
    return out


class LocalisationDataset(Dataset):
    """Samples of a generated benchmark set: the batch-format keys plus the ground truth."""

    EXTRA_KEYS = ("gt_mask", "digit_mask", "box", "cue_mask", "cue_label", "cue_box")

    def __init__(self, data: dict[str, Tensor]) -> None:
        self.data = data
        self.ids = torch.arange(data["image"].shape[0])

    def __len__(self) -> int:
        return int(self.data["image"].shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample: dict[str, Any] = {
            "index": index,
            "image": self.data["image"][index],
            "label": int(self.data["label"][index]),
        }
        for key in self.EXTRA_KEYS:
            if key in self.data:
                sample[key] = self.data[key][index]
        return sample


def collate_localisation(samples: list[dict[str, Any]], empty_image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """:func:`~neuromask_pl.data.collate_samples` plus the stacked ground-truth tensors."""
    batch = collate_samples(samples, empty_image_shape)
    good = [s for s in samples if "error" not in s]
    for key in LocalisationDataset.EXTRA_KEYS:
        if samples and key in samples[0]:
            batch[key] = torch.stack([s[key] for s in good]) if good else torch.empty(0)
    return batch


class LocalisationDataModule(ExplainDataModule):
    """The localisation benchmark as explanation batches (see the module docstring for the design).

    Batches hold ``image``, ``index``, ``label`` and ``skipped`` as usual, plus ``gt_mask`` and
    ``digit_mask`` (B x 1 x H x W bool), ``box`` (B x 4) and, for the spurious variant,
    ``cue_mask``, ``cue_label`` and ``cue_box``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        n: number of images.
        spurious: the variant with the label-coding cue.
        cue: ``"agree"`` or ``"independent"`` (see :func:`make_localisation_set`).
        canvas: image side.
        digit_size: digit side.
        seed: scene seed.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches in page-locked memory; defaults to whether CUDA is available.
    """

    def __init__(
        self,
        split: str = "test",
        n: int = 500,
        spurious: bool = False,
        cue: str | None = None,
        canvas: int = 64,
        digit_size: int = 24,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory)
        self.save_hyperparameters()
        _check_args(split, n, canvas, digit_size, seed, spurious, cue, 6)
        if n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        self.split, self.n, self.spurious, self.cue = split, n, spurious, cue
        self.canvas, self.digit_size, self.seed = canvas, digit_size, seed

    def _empty_image_shape(self) -> tuple[int, int, int]:
        return (3, self.canvas, self.canvas)

    def _build_dataset(self) -> Dataset:
        data = make_localisation_set(
            self.split, self.n, self.canvas, self.digit_size, self.seed, self.spurious, self.cue
        )
        return LocalisationDataset(data)

    def _collate_fn(self) -> Any:
        return functools.partial(collate_localisation, empty_image_shape=self._empty_image_shape())


# --------------------------------------------------------------------------- classifier


class SmallCNN(nn.Module):
    """A small CNN for 3 x 64 x 64 images in [0, 1] (any size works): four conv-BN-ReLU blocks,
    global max pooling (the digit may be anywhere) and a linear layer; 61 k parameters (245 KB in fp32).

    Args:
        num_classes: number of output classes.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        widths = (3, 16, 32, 64, 64)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            stride = 2 if i == 0 else 1  # a strided first layer: cheap at 64 x 64, strokes are >= 3 pixels wide
            layers += [nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            if 0 < i < len(widths) - 2:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits B x num_classes for images B x 3 x H x W."""
        return self.head(self.pool(self.features(x)).flatten(1))


def checkpoint_path(variant: str) -> str:
    """Path of the shipped checkpoint ``neuromask_pl/assets/localisation_<variant>.pt``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return str(importlib.resources.files("neuromask_pl").joinpath(_ASSETS, f"localisation_{variant}.pt"))
