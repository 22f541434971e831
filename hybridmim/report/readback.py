"""Read a report file back into cells and compare it with a re-derived copy, number by number.

The report writes each table as CSV, Markdown and LaTeX (and figures' data as CSV). To audit a
file, it is parsed back into cells — ``(line, row, column, text)`` — and compared position by
position with the same file re-derived from the live MLflow runs. Within a cell, every number is
compared with a tolerance equal to the rounding the file shows (``81.23`` stands for anything in
[81.225, 81.235]); the text around the numbers must be identical. Formats:

- ``.csv``: one cell per field, the row named by its ``cell`` column (else its first field);
- ``.md``: pipe tables (header line, separator, rows); other lines are one text cell each;
- ``.tex``: ``tabular`` rows split on unescaped ``&``, columns named by the header rows above
  ``\\midrule``; other lines are one text cell each;
- anything else textual: one text cell per line.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

# A number as the report prints it ("n=2" holds one); digits inside a word (a run id, "frac1")
# are text, and so are nan/inf.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?!\w)")
_LATEX_SPLIT = re.compile(r"(?<!\\)&")


@dataclass(frozen=True)
class Cell:
    line: int  # 1-based line of the file
    row: str
    column: str
    text: str


def numbers(text: str) -> tuple[list[str], str]:
    """The numbers of a cell as printed, and the cell's text with each number replaced by #."""
    return _NUMBER.findall(text), _NUMBER.sub("#", text)


def shown_rounding(token: str) -> float:
    """Half a unit in the last printed digit: the rounding a printed number stands for."""
    mantissa, _, exponent = token.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 0.5 * 10.0 ** max(-300, min(300, int(exponent or 0) - decimals))


def read_cells(path: Path, text: str | None = None) -> list[Cell]:
    """Parse a report file (by its suffix) into cells; ``text`` overrides reading ``path``."""
    text = path.read_text(encoding="utf-8") if text is None else text
    parse = {".csv": _csv_cells, ".md": _markdown_cells, ".tex": _latex_cells}.get(
        path.suffix.lower(), _line_cells)
    return parse(text)


def _line_cells(text: str) -> list[Cell]:
    return [Cell(i, f"line {i}", "text", line) for i, line in enumerate(text.splitlines(), 1)]


def _csv_cells(text: str) -> list[Cell]:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    header, cells = rows[0], []
    name_at = header.index("cell") if "cell" in header else 0
    cells += [Cell(1, "header", f"column {j + 1}", value) for j, value in enumerate(header)]
    for i, row in enumerate(rows[1:], 2):
        name = row[name_at] if name_at < len(row) else f"line {i}"
        for j, value in enumerate(row):
            column = header[j] if j < len(header) else f"column {j + 1}"
            cells.append(Cell(i, name, column, value))
    return cells


def _markdown_cells(text: str) -> list[Cell]:
    cells, header = [], None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.lstrip().startswith("|"):
            header = None
            cells.append(Cell(i, f"line {i}", "text", line))
            continue
        parts = [part.strip() for part in line.strip().strip("|").split("|")]
        if header is None:
            header = parts
            cells += [Cell(i, "header", f"column {j + 1}", p) for j, p in enumerate(parts)]
        elif all(set(p) <= set(":- ") and p for p in parts):
            cells.append(Cell(i, "separator", "text", line.strip()))
        else:
            cells += [Cell(i, parts[0], header[j] if j < len(header) else f"column {j + 1}", p)
                      for j, p in enumerate(parts)]
    return cells


def _latex_cells(text: str) -> list[Cell]:
    cells: list[Cell] = []
    header: list[str] | None = None
    in_header = False
    for i, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith(r"\begin{tabular}"):
            header, in_header = [], True
        elif stripped == r"\midrule":
            in_header = False
        if header is None or "&" not in stripped:
            cells.append(Cell(i, f"line {i}", "text", line))
            continue
        parts = [p.strip() for p in _LATEX_SPLIT.split(stripped.removesuffix(r"\\").strip())]
        if in_header:
            # Column names are spread over the header rows (pandas puts index names below).
            header = [" ".join(filter(None, (header[j] if j < len(header) else "", p)))
                      for j, p in enumerate(parts)]
            cells += [Cell(i, "header", f"column {j + 1}", p) for j, p in enumerate(parts)]
        else:
            cells += [Cell(i, parts[0], header[j] if j < len(header) and header[j]
                           else f"column {j + 1}", p) for j, p in enumerate(parts)]
    return cells


def compare_cells(shown: list[Cell], derived: list[Cell], limit: int = 20
                  ) -> list[tuple[str, str]]:
    """Differences between a file's cells and the re-derived ones (empty: they agree) as
    (where: line, row and column; what differs); at most ``limit`` are spelled out."""
    problems = [problem for problem in map(_compare_cell, shown, derived) if problem]
    if len(shown) != len(derived):
        problems.append(("whole file", f"{len(shown)} cells, but the re-derived file has "
                         f"{len(derived)}: rows or columns were added or removed"))
    if len(problems) > limit:
        problems = problems[:limit] + [("more", f"… and {len(problems) - limit} more "
                                                "differences")]
    return problems


def _compare_cell(ours: Cell, ref: Cell) -> tuple[str, str] | None:
    where = f"line {ours.line}, row {ours.row!r}, column {ours.column!r}"
    ours_numbers, ours_text = numbers(ours.text)
    ref_numbers, ref_text = numbers(ref.text)
    if ours_text != ref_text or len(ours_numbers) != len(ref_numbers):
        return where, f"shows {ours.text!r}, re-derived {ref.text!r}"
    for a, b in zip(ours_numbers, ref_numbers):
        tolerance = max(shown_rounding(a), shown_rounding(b))
        # The tiny relative slack absorbs binary floating point at the rounding boundary.
        if not math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=tolerance * (1 + 1e-9)):
            return where, (f"shows {a}, re-derived from the MLflow runs {b} (tolerance "
                           f"±{tolerance:g}, the rounding shown) in {ours.text!r}")
    return None
