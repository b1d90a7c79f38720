"""Loupe Browser category CSVs: spots to label and predictions out, a pathologist's labels in.

Loupe Browser (10x Genomics) imports and exports a category as a CSV whose first column is
``Barcode`` and whose second column, named after the category, holds each spot's group. Files
exported from Loupe or edited in a spreadsheet come with a few quirks, all accepted here: a
UTF-8 byte-order mark, Windows line endings, the header in another case (``barcode``),
extra columns, quoted fields, blank lines and empty cells (a spot left unassigned).
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._constants import TABLE_KEY
from .._docs import d
from .._logging import log_added, logger
from .._spatial import get_table
from .._utils import warn
from .._validate import assert_key_in, obs_mask

_BARCODE = "barcode"


class LoupeFormatError(ValueError):
    """A Loupe CSV that cannot be read; the message names the file and line."""


def _barcodes(table, barcode_key: str | None) -> pd.Index:
    if barcode_key is None:
        idx = pd.Index(table.obs_names.astype(str))
        if idx.has_duplicates:
            msg = (f"obs_names has duplicate spot names, e.g. {list(idx[idx.duplicated()][:3])}; Loupe barcodes must "
                   "be unique: pass barcode_key= (an .obs column of Loupe barcodes) or run adata.obs_names_make_unique().")
            raise ValueError(msg)
        return idx
    assert_key_in(table.obs, barcode_key, where="table.obs", hint="Pass the .obs column holding the Loupe barcodes.")
    col = table.obs[barcode_key]
    if col.isna().any():
        msg = f"obs[{barcode_key!r}] has missing barcodes; every spot needs one."
        raise ValueError(msg)
    idx = pd.Index(col.astype(str).to_numpy())
    if idx.has_duplicates:
        msg = f"obs[{barcode_key!r}] has duplicate barcodes, e.g. {list(idx[idx.duplicated()][:3])}."
        raise ValueError(msg)
    return idx


def _names(values, limit: int = 10) -> str:
    vals = list(values)
    shown = ", ".join(repr(v) for v in vals[:limit])
    return f"[{shown}{', …' if len(vals) > limit else ''}] ({len(vals)} in all)"


@d.dedent
def write_loupe(
    data: Any,
    path: str | os.PathLike,
    key: str = "si_annotation",
    *,
    subset: str | np.ndarray | None = None,
    column: str | None = None,
    barcode_key: str | None = None,
    table_key: str = TABLE_KEY,
    overwrite: bool = False,
) -> Path:
    """Write an ``.obs`` column as a Loupe Browser category CSV (``Barcode,<category>``).

    Import it in Loupe Browser with *Categories → Upload/Import CSV*. Spots with a missing
    value are left out (Loupe shows them unassigned). A boolean column (e.g. the spots proposed
    by :func:`stimg.tl.annotate`, ``'si_to_label'``) writes its ``True`` spots, each with the
    category name as its value, so they appear as one group.

    Parameters
    ----------
    %(data)s
    path
        CSV file to write.
    key
        ``.obs`` column to export: predictions (``'si_annotation'``), labels, or a boolean column.
    subset
        Only these spots: a boolean ``.obs`` column name or mask (e.g. ``'si_to_label'`` to
        pre-fill the proposed spots with the model's predictions).
    column
        Category name in the header; ``None`` uses ``key``.
    barcode_key
        ``.obs`` column holding the Loupe barcodes; ``None`` uses ``obs_names``.
    %(table_key)s
    overwrite
        Replace an existing file.

    Returns
    -------
    The path written.

    Examples
    --------
    >>> si.io.write_loupe(adata, "to_label.csv", "si_annotation", subset="si_to_label")  # doctest: +SKIP
    """
    table = get_table(data, table_key)
    path = Path(path)
    assert_key_in(table.obs, key, where="table.obs", hint="Run si.tl.annotate first, or pass the column to export.")
    if path.exists() and not overwrite:
        msg = f"{str(path)!r} exists; pass overwrite=True to replace it."
        raise FileExistsError(msg)
    name = str(key if column is None else column)
    if not name.strip():
        msg = "The category name (column=) must not be empty."
        raise ValueError(msg)
    barcodes = _barcodes(table, barcode_key)
    keep = obs_mask(table, subset, "subset")
    col = table.obs[key]
    if col.dtype == bool:
        keep = keep & col.to_numpy()
        values = np.full(table.n_obs, name, dtype=object)
    else:
        values = col.astype(object).to_numpy()
        keep = keep & pd.notna(values)
        values = np.array([str(v) for v in values], dtype=object)
        if empty := [b for b, v, k in zip(barcodes, values, keep, strict=True) if k and not v.strip()]:
            msg = f"obs[{key!r}] has empty labels for barcodes {_names(empty)}; use missing values instead."
            raise ValueError(msg)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["Barcode", name])
    for b, v in zip(barcodes[keep], values[keep], strict=True):
        w.writerow([b, v])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(buf.getvalue(), encoding="utf-8", newline="")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("wrote %d spots of obs[%r] to %s", int(keep.sum()), key, path)
    return path


def _parse(path: Path, column: str | None) -> tuple[pd.Series, str]:
    """Barcode → label of a Loupe CSV (empty cells skipped), and the label column's name."""
    if not path.is_file():
        msg = f"Loupe CSV {str(path)!r} not found."
        raise FileNotFoundError(msg)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        msg = (f"{str(path)!r} line {line}: not UTF-8 text ({e.reason}); export the CSV from Loupe Browser or save it "
               "as 'CSV UTF-8'.")
        raise LoupeFormatError(msg) from None
    if "\x00" in text:
        msg = f"{str(path)!r} is a binary file, not a Loupe CSV."
        raise LoupeFormatError(msg)
    first = text.lstrip("\r\n").split("\n", 1)[0]
    delim = ","
    if "," not in first:
        delim = next((c for c in ("\t", ";") if c in first), ",")
    rows = csv.reader(io.StringIO(text, newline=""), delimiter=delim, strict=True)
    header: list[str] | None = None
    out: dict[str, tuple[str, int]] = {}
    try:
        for row in rows:
            line = rows.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if header is None:
                header = [c.strip() for c in row]
                low = [h.lower() for h in header]
                if _BARCODE not in low:
                    msg = (f"{str(path)!r} line {line}: no 'Barcode' column in the header {header}; a Loupe CSV "
                           "starts with 'Barcode,<category>'.")
                    raise LoupeFormatError(msg)
                if low.count(_BARCODE) > 1:
                    msg = f"{str(path)!r} line {line}: the header has several 'Barcode' columns {header}."
                    raise LoupeFormatError(msg)
                ib = low.index(_BARCODE)
                others = [h for i, h in enumerate(header) if i != ib]
                if column is None:
                    if len(others) != 1:
                        msg = (f"{str(path)!r} has {len(others)} category columns {others}; pass column= to choose "
                               "the one with the labels.")
                        raise LoupeFormatError(msg)
                    il = header.index(others[0])
                else:
                    exact = [i for i, h in enumerate(header) if h == column and i != ib]
                    loose = [i for i, h in enumerate(header) if h.lower() == column.strip().lower() and i != ib]
                    if not (exact or len(loose) == 1):
                        msg = f"column {column!r} is not in the header of {str(path)!r}: {others}."
                        raise KeyError(msg)
                    il = (exact or loose)[0]
                continue
            if len(row) != len(header):
                msg = (f"{str(path)!r} line {line}: {len(row)} fields where the header has {len(header)} "
                       f"({header}); got {row}.")
                raise LoupeFormatError(msg)
            bc, lab = row[ib].strip(), row[il]
            if not bc:
                msg = f"{str(path)!r} line {line}: empty barcode."
                raise LoupeFormatError(msg)
            lab = lab.rstrip("\r")
            if not lab.strip():
                continue  # unassigned in Loupe
            if bc in out and out[bc][0] != lab:
                msg = (f"{str(path)!r} line {line}: barcode {bc!r} is labelled {lab!r} here but {out[bc][0]!r} on "
                       f"line {out[bc][1]}.")
                raise LoupeFormatError(msg)
            out.setdefault(bc, (lab, line))
    except csv.Error as e:
        msg = f"{str(path)!r} line {rows.line_num}: malformed CSV ({e})."
        raise LoupeFormatError(msg) from None
    if header is None:
        msg = f"{str(path)!r} is empty; a Loupe CSV starts with the header 'Barcode,<category>'."
        raise LoupeFormatError(msg)
    return pd.Series({b: v for b, (v, _) in out.items()}, dtype=object), header[il]


@d.dedent
def read_loupe(
    data: Any,
    path: str | os.PathLike,
    *,
    key_added: str | None = None,
    column: str | None = None,
    barcode_key: str | None = None,
    classes: Sequence[str] | None = None,
    on_unknown: str = "raise",
    table_key: str = TABLE_KEY,
    inplace: bool = True,
) -> pd.Series | None:
    """Merge a pathologist's Loupe Browser CSV of labels into ``.obs``.

    Every barcode in the file gets its label in ``.obs[key_added]`` (a correction replaces the
    previous label); spots not in the file keep theirs, other columns are not touched. Empty
    cells are skipped. Nothing is dropped silently:

    - a barcode that is not a spot of the table is an error naming it (``on_unknown='warn'``:
      a warning naming it, and the row is skipped);
    - a label that is not yet a class of ``.obs[key_added]`` (a class first met in a later
      round, or a typo) is added and reported by name in a warning; with ``classes=`` (the
      fixed list of classes) a label outside the list is an error naming it
      (``on_unknown='warn'``: a warning, and it is added).

    Parameters
    ----------
    %(data)s
    path
        CSV exported from Loupe Browser (``Barcode,<category>``; BOM, CRLF, header case and
        extra columns are handled).
    key_added
        ``.obs`` column to merge into (created when absent); ``None`` uses the CSV's category name.
    column
        Category column of the CSV when it has several.
    barcode_key
        ``.obs`` column holding the Loupe barcodes; ``None`` uses ``obs_names``.
    classes
        The fixed list of classes; labels outside it are refused (see ``on_unknown``).
    on_unknown
        ``'raise'`` or ``'warn'`` for unknown barcodes and labels outside ``classes``.
    %(table_key)s
    %(inplace)s

    Returns
    -------
    With ``inplace=False``, the merged labels (a categorical Series indexed like ``.obs``, missing
    where unlabelled); otherwise ``None``.

    Examples
    --------
    >>> si.io.read_loupe(adata, "pathologist_round1.csv", key_added="pathologist")  # doctest: +SKIP
    >>> si.tl.annotate(adata, "pathologist", model=res.model)  # doctest: +SKIP
    """
    start = time.perf_counter()
    if on_unknown not in ("raise", "warn"):
        msg = f"on_unknown must be 'raise' or 'warn', got {on_unknown!r}."
        raise ValueError(msg)
    table = get_table(data, table_key)
    path = Path(path)
    read, name = _parse(path, column)
    key = name if key_added is None else key_added
    barcodes = _barcodes(table, barcode_key)
    pos = barcodes.get_indexer(read.index)
    if unknown := list(read.index[pos < 0]):
        msg = (f"{len(unknown)} barcodes of {str(path)!r} are not spots of this table: {_names(unknown)}. "
               f"The table's barcodes look like {list(barcodes[:2])}; pass barcode_key= (the .obs column of Loupe "
               "barcodes), check the section, or on_unknown='warn' to skip them.")
        if on_unknown == "raise":
            raise KeyError(msg)
        warn(msg)
        read, pos = read[pos >= 0], pos[pos >= 0]
    if key in table.obs:
        prev = table.obs[key]
        known = list(prev.cat.categories) if isinstance(prev.dtype, pd.CategoricalDtype) else list(prev.dropna().unique())
        known = [str(k) for k in known]
        prev_vals = prev.astype(object).where(prev.notna(), None).map(lambda v: v if v is None else str(v)).to_numpy()
    else:
        known, prev_vals = [], np.full(table.n_obs, None, dtype=object)
    labels_read = pd.unique(read.to_numpy())
    if classes is not None:
        allowed = [str(c) for c in classes]
        if outside := [lab for lab in labels_read if lab not in allowed]:
            msg = (f"{str(path)!r} has labels outside classes=: {_names(outside)}; allowed: {allowed}. Fix them in "
                   "Loupe, extend classes=, or pass on_unknown='warn' to add them anyway.")
            if on_unknown == "raise":
                raise ValueError(msg)
            warn(msg)
        known = [*allowed, *(k for k in known if k not in allowed)]
    elif known and (new := [lab for lab in labels_read if lab not in known]):
        warn(f"{str(path)!r} brings labels that are not classes of obs[{key!r}] yet: {_names(new)}; they are added as "
             f"new classes (known: {known}). If they are typos, fix them in Loupe and read the file again; pass "
             "classes= to refuse labels outside a fixed list.")
    vals = prev_vals.copy()
    vals[pos] = read.to_numpy()
    cats = known + [c for c in labels_read if c not in known]
    merged = pd.Series(pd.Categorical(vals, categories=cats), index=table.obs_names, name=key)
    n_changed = int(sum(1 for i, v in zip(pos, read.to_numpy(), strict=True) if prev_vals[i] is not None and prev_vals[i] != v))
    logger.info("read_loupe: %d labels from %s (%d new, %d corrected) into obs[%r]", len(read), path.name,
                int(sum(prev_vals[i] is None for i in pos)), n_changed, key)
    if not inplace:
        return merged
    table.obs[key] = merged.array
    log_added("obs", key, start)
    return None
