"""flags.csv: a sweep's units ranked by AUC, one row each, after '#' comment lines naming the label sources
and the flag rule. (Re)written from the sweep record by every sweep, whole or not at all."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..records.sweep import NEURONS, SweepResult
from ..storage.files import CsvWriter, write_text
from ..records.keys import as_basis

DEFAULT_OUT = Path("outputs") / "sweep"
FLAGS_COLUMNS = ("rank", "unit", "auc", "p", "q", "correlation", "top_nsfw_share", "text_nsfw_share", "flagged",
                 "text_flag", "why", "top_texts")


def flags_path(layer: str, out: Optional[str | os.PathLike] = None, basis=None) -> Path:
    """--out FILE.csv, --out DIR (DIR/flags.csv), or outputs/sweep/<layer>/flags.csv (an SAE basis:
    outputs/sweep/<layer>_sae-<name>/flags.csv)."""
    if out is None:
        folder = layer if as_basis(basis) is None else f"{layer}_sae-{basis.name}"
        return DEFAULT_OUT / folder / "flags.csv"
    out = Path(out)
    return out if out.suffix.lower() == ".csv" else out / "flags.csv"


def _rounded(value: Optional[float], digits: int, significant: bool = False) -> Optional[float]:
    """A number for flags.csv (None -> empty cell): `digits` decimals, or 4 significant digits."""
    if value is None or not np.isfinite(value):
        return None
    return float(f"{value:.4g}") if significant else round(float(value), digits)


def flags_header(result: SweepResult) -> List[str]:
    """The comment lines at the top of flags.csv (each starts with '#'): the label sources and the rule."""
    s = result.scores
    what = result.layer if result.basis == NEURONS else \
        f"the features of SAE {result.basis_name} on {result.layer} (basis {result.basis}; unit = feature)"
    lines = [f"# neurolens sweep of {what}: {s.n_pos} positive and {s.n_neg} negative images, "
             f"AUC {s.method}; flagged when {s.rule.describe()}"]
    lines += [f"# {line}" for line in result.lines()]
    # one unquoted cell per line: no comma, quote or line break (a spreadsheet shows it as text after '#')
    return [line.replace("\n", " ").replace("\r", " ").replace(",", ";").replace('"', "'") for line in lines]


def write_flags_csv(result: SweepResult, path: Path, texts: int = 3) -> Path:
    """One row per unit, ranked by AUC, after '#' comment lines naming the label sources and the rule (skip
    lines starting with '#' to read it, e.g. pandas.read_csv(path, skiprows=<their count>)). Written
    atomically; every row goes through neurolens.storage.files.csv_line (no spreadsheet formula can run)."""
    buffer = io.StringIO(newline="")
    for line in flags_header(result):
        buffer.write(line + "\n")
    writer = CsvWriter(buffer)
    writer.writerow(FLAGS_COLUMNS)
    for rank, row in enumerate(result.ranking(), start=1):
        top = " | ".join(t for t, _, _ in result.top_texts(row["unit"], texts))
        writer.writerow((
            rank, row["unit"], _rounded(row["auc"], 6), _rounded(row["p"], 300, significant=True),
            _rounded(row["q"], 300, significant=True), round(row["correlation"], 6), round(row["top_nsfw_share"], 4),
            _rounded(row["text_nsfw_share"], 4), int(row["flagged"]), int(row["text_flag"]), row["why"], top))
    return write_text(path, buffer.getvalue())
