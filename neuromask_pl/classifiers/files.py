"""Files a classifier is loaded from: existence checks, load-failure reasons, class-name files, hashes."""

from __future__ import annotations

import functools
import logging
import os
import pickle
from pathlib import Path

from neuromask_pl.store.io import sha256_file

logger = logging.getLogger(__name__)


def existing_file(path: str | os.PathLike[str], what: str) -> str:
    """Return ``path`` as a string, or raise FileNotFoundError naming it."""
    resolved = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(resolved):
        raise FileNotFoundError(f"{what} file not found: {resolved!r}; check the path")
    return resolved


def load_failure_reason(error: Exception) -> str:
    """A one-line reason for a failed load."""
    if isinstance(error, pickle.UnpicklingError):
        return (
            "it holds Python objects other than tensors (e.g. a whole model saved with "
            "torch.save(model)); save model.state_dict() instead"
        )
    if isinstance(error, EOFError):
        return "the file ends too early (empty or truncated)"
    first_sentence = str(error).strip().split("\n")[0].split(". ")[0]
    return f"{type(error).__name__}: {first_sentence[:300]}"


def read_class_names(
    names: list[str] | str | os.PathLike[str] | None, num_classes: int | None = None
) -> list[str] | None:
    """Class names from a list or a text file (one per line); checked against ``num_classes``."""
    if names is None:
        return None
    if isinstance(names, (str, os.PathLike)):
        path = existing_file(names, "class names")
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        source = f"the class names file {path!r}"
    else:
        source = "class_names"
        if not all(isinstance(n, str) for n in names):
            raise TypeError("class_names must be a list of strings, a text file path, or None")
        names = list(names)
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(
            f"{source} has {len(names)} names but the model has {num_classes} classes; "
            "give exactly one name per class, in class-index order"
        )
    return names


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """SHA-256 hex digest of a file, cached per path, size and modification time; None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        logger.warning("cannot hash %s: file not found", path)
        return None
    return _sha256_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)
