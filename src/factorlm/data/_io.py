"""Small file helpers shared by the loaders (compressed text, TSV rows, stable hash ordering)."""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
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
