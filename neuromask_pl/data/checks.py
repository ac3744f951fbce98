"""Checks at the package's boundary: images going in, and the classifier frozen while explaining."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode without parameter gradients; restore every flag on exit."""
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.requires_grad) for p in module.parameters()]
    module.eval().requires_grad_(False)
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


def check_images(images: Any) -> Tensor:
    """Validate a batch of images: a float tensor B x C x H x W, finite, in [0, 1]."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape B x C x H x W, got {type(images).__name__}")
    if images.ndim != 4:
        hint = " (add a batch dimension with images.unsqueeze(0))" if images.ndim == 3 else ""
        raise ValueError(f"images must have shape B x C x H x W, got {tuple(images.shape)}{hint}")
    if images.numel() == 0:
        raise ValueError(f"images are empty: shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be float in [0, 1], got dtype {images.dtype}; divide uint8 images by 255")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf pixels; clean or drop those images first")
    low, high = float(images.min()), float(images.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(
            f"images must be in [0, 1] pixel space (masks hide pixels towards the baseline), got values in "
            f"[{low:.3g}, {high:.3g}]; put input normalisation inside the classifier wrapper"
        )
    return images


def integral_ids(values: Any, name: str, count: int | None = None, nonnegative: bool = True) -> Tensor:
    """``values`` (ints, an int tensor, or floats that are whole numbers) as a long CPU tensor (of ids >= 0).

    Raises ValueError for fractional, boolean, (with ``nonnegative``) negative or (with ``count``) a wrong number
    of values.
    """
    if _holds_text(values):
        raise TypeError(f"{name} must be integers, got text {values!r}")
    tensor = torch.as_tensor(values).detach().cpu().view(-1)
    if tensor.dtype == torch.bool or (tensor.is_floating_point() and not torch.equal(tensor, tensor.round())):
        raise ValueError(f"{name} must be whole numbers, got {tensor.tolist()[:10]}")
    if tensor.is_complex() or not (tensor.is_floating_point() or tensor.dtype in _INTEGER_DTYPES):
        raise TypeError(f"{name} must be integers, got dtype {tensor.dtype}")
    if count is not None and tensor.numel() != count:
        raise ValueError(f"{name} must be {count} values, one per image, got {tensor.numel()}")
    if nonnegative and (tensor < 0).any():
        raise ValueError(f"{name} must be >= 0, got {tensor.tolist()[:10]}")
    return tensor.long()


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _holds_text(values: Any) -> bool:
    return isinstance(values, str) or (isinstance(values, (list, tuple)) and any(isinstance(v, str) for v in values))


def targets_by_name(values: Any, class_names: Sequence[str] | None) -> Any:
    """Class names among ``values`` (a str, or a list or tuple holding some) as their indices in ``class_names``
    (exact, else ignoring case); anything else is returned unchanged.

    Raises:
        ValueError: a name that is not a class name (with the closest ones), or names for a classifier without
            ``class_names``; one line each.
    """
    if not _holds_text(values):
        return values
    if not class_names:
        raise ValueError(
            f"targets must be class indices (ints), got {values!r}: the classifier has no class_names to map names "
            "through"
        )
    names = list(class_names)
    exact = {name: i for i, name in reversed(list(enumerate(names)))}
    folded = {str(name).casefold(): i for i, name in reversed(list(enumerate(names)))}
    out = []
    for value in [values] if isinstance(values, str) else values:
        if not isinstance(value, str):
            out.append(value)
        elif value in exact:
            out.append(exact[value])
        elif value.casefold() in folded:
            out.append(folded[value.casefold()])
        else:
            if len(names) <= 10:
                known = f"its {len(names)} classes: {', '.join(repr(n) for n in names)}"
            else:
                close = difflib.get_close_matches(value, [str(n) for n in names], n=5)
                known = f"{len(names)} classes" + (f"; closest: {', '.join(repr(c) for c in close)}" if close else "")
            raise ValueError(f"target {value!r} is not a class name of the classifier ({known})")
    return out[0] if isinstance(values, str) else out


def device_of(module: nn.Module, fallback: torch.device) -> torch.device:
    """Where a module's parameters (else buffers) live, or ``fallback`` for a module without tensors."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else fallback


def check_target_class(target_class: Any) -> None:
    """A fixed target class is an int >= 0 (not a bool, not 1.5), or None."""
    if target_class is not None and (isinstance(target_class, bool) or not isinstance(target_class, int)
                                     or target_class < 0):  # fmt: skip
        raise ValueError(f"target_class must be a class index >= 0 (an int), got {target_class!r}")


# Where a classifier's channel count comes from: facts about the classifier, and guesses.
KNOWN_CHANNELS = {
    "given": "its in_channels",
    "statistics": "its per-channel mean/std",
    "convolution": "its first convolution",
}
GUESSED_CHANNELS = {
    "first Linear layer": "from its first Linear layer",
    "one-channel statistics": "from its one-channel mean/std",
    "default": "nothing in it says how many: no convolution, no in_channels, no per-channel mean/std",
}
_KIND = {1: "grey", 3: "RGB"}


def expected_channels(classifier: nn.Module) -> int | None:
    """The channel count a classifier takes (see :func:`channel_evidence`), or None if nothing says."""
    return channel_evidence(classifier)[0]


def channel_evidence(classifier: nn.Module) -> tuple[int | None, str]:
    """How many image channels a classifier takes, and what says so.

    Returns ``(count, source)``: ``"given"`` for an ``in_channels`` attribute (a classifier wrapper names where its
    own count came from in ``in_channels_from``: a key of :data:`KNOWN_CHANNELS` or :data:`GUESSED_CHANNELS`),
    ``"convolution"`` for its first convolution's, ``"first Linear layer"`` for a network without convolutions whose
    first Linear layer takes ``side x side`` values (1 channel) or ``3 x side x side`` (3), side >= 8;
    ``(None, "")`` when nothing says.
    """
    channels = getattr(classifier, "in_channels", None)
    if isinstance(channels, int) and not isinstance(channels, bool) and channels > 0:
        source = getattr(classifier, "in_channels_from", "given")
        return channels, source if source in KNOWN_CHANNELS or source in GUESSED_CHANNELS else "given"
    conv, features = _first_layers(classifier)
    if conv is not None:
        return conv, "convolution"
    flat = _flat_channels(features)
    return (flat, "first Linear layer") if flat is not None else (None, "")


def _first_layers(classifier: nn.Module) -> tuple[int | None, int | None]:
    """The input channels of the first convolution and the input features of the first Linear layer (or None);
    TorchScript modules count by their original class name."""
    conv = linear = None
    for module in classifier.modules():
        name = getattr(module, "original_name", None) if isinstance(module, torch.jit.ScriptModule) else None
        weight = getattr(module, "weight", None)
        width = int(weight.shape[1]) if isinstance(weight, Tensor) and weight.ndim >= 2 else None
        if isinstance(module, nn.modules.conv._ConvNd) or name in ("Conv1d", "Conv2d", "Conv3d"):
            conv = getattr(module, "in_channels", None) or width
            break
        if linear is None and (isinstance(module, nn.Linear) or name == "Linear"):
            linear = getattr(module, "in_features", None) or width
    return conv, linear


def _flat_channels(features: int | None) -> int | None:
    """1 for ``side x side`` input features, 3 for ``3 x side x side`` (side >= 8), else None."""
    for channels in (1, 3):
        if features is not None and features % channels == 0:
            side = math.isqrt(features // channels)
            if side >= 8 and side * side * channels == features:
                return channels
    return None


def check_images_fit(images: Tensor, classifier: nn.Module) -> None:
    """Images of the channel count and float type the classifier takes, or a ValueError that says what to do."""
    _check_channels(images, classifier)
    weight = next((p for p in classifier.parameters() if p.is_floating_point()), None)
    if weight is not None and (images.dtype == torch.float64) != (weight.dtype == torch.float64):
        raise ValueError(
            f"images are {images.dtype} but the classifier's weights are {weight.dtype}; convert the images "
            f"with images.to({weight.dtype}) (or the classifier with classifier.to({images.dtype}))"
        )


def read_as(channels: int) -> str:
    """How to read images with ``channels`` channels, in Python and on the command line of the shipped configs."""
    return (
        f"read the images as {channels} channel(s): ImageFolderDataModule(channels={channels}), "
        f"explain_folder(..., channels={channels}), on the command line --data.init_args.channels {channels}"
    )


def give_in_channels(channels: int) -> str:
    """How to tell a classifier wrapper its channel count, in Python and on the command line."""
    return (
        f"give the classifier in_channels={channels} (on the command line "
        f"--model.classifier.init_args.in_channels {channels})"
    )


def _check_channels(images: Tensor, classifier: nn.Module) -> None:
    """The images' channel count against the classifier's: a fact (its in_channels, per-channel statistics, first
    convolution) must match; a guess gives way to a network's first Linear layer, which the flattened image must fit."""
    have, height, width = images.shape[1], images.shape[-2], images.shape[-1]
    channels, source = channel_evidence(classifier)
    if channels is None or (source in KNOWN_CHANNELS and have == channels):
        return
    takes = f"images have {have} channel(s) but the classifier takes {channels} ({_KIND.get(channels, 'channels')})"
    if source in KNOWN_CHANNELS:
        raise ValueError(f"{takes}, as {KNOWN_CHANNELS[source]} says: {read_as(channels)}")
    conv, features = _first_layers(classifier)
    fits = features // (height * width) if conv is None and features is not None else None
    if fits == have and features == fits * height * width:
        return  # the flattened images fit the network's first layer
    if fits in (1, 3) and features == fits * height * width:
        wrapper = hasattr(classifier, "in_channels_from") and channels != fits
        raise ValueError(
            f"images have {have} x {height} x {width} values but the classifier's first Linear layer takes {features} "
            f"= {fits} x {height} x {width}: {read_as(fits)}" + (f"; and {give_in_channels(fits)}" if wrapper else "")
        )
    if have == channels:
        return
    raise ValueError(
        f"{takes}, a guess ({GUESSED_CHANNELS[source]}): if it takes {have}, {give_in_channels(have)}; "
        f"if it takes {channels}, {read_as(channels)}"
    )


def check_logits(logits: Any, batch: int) -> Tensor:
    """The classifier's output must be finite logits B x K with K >= 2 (not probabilities, not one column)."""
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != batch:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        hint = " (a Hugging Face output? its logits are .logits)" if hasattr(logits, "logits") else ""
        raise TypeError(
            f"the classifier must return logits of shape B x K, got {got}{hint}; wrap it so that forward returns "
            "the class logits tensor, e.g. neuromask_pl.classifiers.ClassifierWrapper(model, output='logits')"
        )
    if logits.shape[1] < 2:
        raise ValueError(
            f"the classifier returns {logits.shape[1]} column(s); NeuroMask needs one logit per class (K >= 2). "
            "For a binary classifier with one logit z, return torch.cat([-z, z], dim=1) / 2"
        )
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).any(1).nonzero()[:, 0].tolist()
        raise ValueError(
            f"the classifier returned NaN or inf logits for image(s) {bad[:10]} of the batch; check the images "
            "(and their normalisation) and the model's weights"
        )
    values = logits.detach().float()
    if values.min() >= 0 and values.max() <= 1 and torch.allclose(values.sum(1), torch.ones(batch), atol=1e-4):
        raise ValueError(
            "the classifier returns probabilities (every row in [0, 1] and summing to 1), but NeuroMask needs "
            "logits: remove its final softmax, or return the log of the probabilities"
        )
    return logits
