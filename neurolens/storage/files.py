"""Files written whole or not at all, and one clear line when the disk refuses.

Every file neurolens writes (cache records, PNGs, figures, CSVs, checkpoints, the toy dataset's table) goes
through `atomic_path`: the content is written to a temporary name in the target's own folder
(`.<name>.<random>.tmp`, so a rename never crosses filesystems), flushed and fsync'ed, then renamed over the
target with os.replace. A reader therefore sees the old file or the new one, never half of one, and a crash
or kill -9 leaves at most a hidden temporary file.

When the write fails (the disk is full, a quota is reached, the filesystem is read-only, permission is
denied, ...), the temporary file is removed and a `WriteError` (a NeurolensError: the CLI prints it as one
line and exits 2) names the path, what went wrong, and what to do: free space, or pass the option that
moves this kind of output elsewhere (`--cache` for cache records, `--out` for outputs).

CSV cells are escaped against spreadsheet formula injection (`csv_cell`, `csv_line`): a text cell that starts
with = + - @, a tab or a carriage return (after any spaces) gets a leading apostrophe, so a spreadsheet shows it
as text instead of running it. A spreadsheet may split the file on another separator than the comma (`;` in many
locales, tab, `|`), and then a quote in the middle of a line does not start a quoted field: so inside a cell,
a formula character right after such a separator or a line break (spaces between) gets an apostrophe too
(`cat;=1+1` is written `cat;'=1+1`), and a text cell holding a separator, a quote, a line break or a formula
character anywhere is quoted. Numbers that neurolens writes (int, float, numpy scalars) are written as numbers.
"""
from __future__ import annotations

import errno
import io
import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from ..errors import NeurolensError

OUT_OPTION = "--out"
CACHE_OPTION = "--cache"

# Characters that make a spreadsheet read a cell as a formula (OWASP "CSV injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# A text cell holding any of these is quoted: separators some locales split on, quotes, line breaks, formulas.
CSV_QUOTE_CHARACTERS = frozenset(",;\t|\"\r\n=+-@")
# A formula character after a separator or line break inside a cell (spaces between) gets an apostrophe.
_FORMULA_AFTER_SEPARATOR = re.compile(r"([,;\t|\r\n] *)(?=[=+\-@])")

_WHAT_WENT_WRONG = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EFBIG: "the file is too large for this filesystem",
    errno.ENOENT: "the folder does not exist",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "a folder of that name is in the way",
}
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# OSErrors that mean "this location cannot take the file" (the CLI turns them into one line, exit 2)
WRITE_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG))


class WriteError(NeurolensError):
    """A file could not be written; the message says which, why, and what to do."""

    def __init__(self, message: str, path: Path, error_number: Optional[int] = None):
        super().__init__(message)
        self.path = Path(path)
        self.errno = error_number


def write_error(path: str | os.PathLike, exc: OSError, option: Optional[str] = OUT_OPTION,
                what: str = "write") -> WriteError:
    """The WriteError for an OSError raised while writing `path` (`what`: 'write' or 'create the folder')."""
    path = Path(path)
    reason = _WHAT_WENT_WRONG.get(exc.errno) or exc.strerror or type(exc).__name__
    if exc.errno in _FULL:
        advice = "free some space and run the same command again (finished work is kept)"
        if option:
            advice += f", or pass {option} to a folder on another disk"
    elif option:
        advice = f"pass {option} to a writable folder"
    else:
        advice = "choose a writable location"
    return WriteError(f"cannot {what} {path}: {reason}; {advice}", path, exc.errno)


def ensure_folder(folder: str | os.PathLike, option: Optional[str] = OUT_OPTION) -> Path:
    """Create `folder` (and its parents) or raise WriteError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(folder, exc, option, what="create the folder") from None
    return folder


@contextmanager
def atomic_path(path: str | os.PathLike, option: Optional[str] = OUT_OPTION, durable: bool = True
                ) -> Iterator[Path]:
    """Yields a temporary path beside `path`; write the content there. On a clean exit it is fsync'ed and
    renamed onto `path`. On any error it is removed; an OSError becomes a WriteError (one line, exit 2).

    durable=False skips the fsyncs: for many small files whose set is marked complete by a manifest
    written (durably) last, e.g. the toy dataset's images."""
    path = Path(path)
    ensure_folder(path.parent, option)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise write_error(path, exc, option) from None
    except BaseException:
        _remove(tmp)
        raise
    if durable:
        fsync_folder(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes, option: Optional[str] = OUT_OPTION,
                durable: bool = True) -> Path:
    """Write `data` to `path` atomically (module docstring)."""
    path = Path(path)
    with atomic_path(path, option, durable) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
    return path


def write_text(path: str | os.PathLike, text: str, option: Optional[str] = OUT_OPTION,
               encoding: str = "utf-8") -> Path:
    return write_bytes(path, text.encode(encoding), option)


def save_png(image, path: str | os.PathLike, option: Optional[str] = OUT_OPTION, durable: bool = True,
             **save_options: Any) -> Path:
    """A PIL image as a PNG at `path`, encoded in memory first (a failing disk never sees a half image)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_options)
    return write_bytes(path, buffer.getvalue(), option, durable)


def csv_cell(value: Any) -> Any:
    """One CSV cell, safe to open in a spreadsheet (module docstring): None -> '', numbers as numbers, text
    starting with a formula character gets a leading apostrophe, and so does one after a separator inside it."""
    if value is None:
        return ""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):   # numpy scalars
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    text = _FORMULA_AFTER_SEPARATOR.sub(r"\1'", str(value))
    return "'" + text if text.lstrip(" ").startswith(FORMULA_PREFIXES) else text


def csv_line(values: Iterable[Any]) -> str:
    """One CSV row (comma-separated, CRLF-terminated like the csv module's): every cell through csv_cell, and
    quoted (inner quotes doubled) when it holds a separator, quote, line break or formula character anywhere
    (module docstring). csv.reader and spreadsheets read it back cell for cell."""
    cells = []
    for value in values:
        cell = csv_cell(value)
        if isinstance(cell, str):
            if CSV_QUOTE_CHARACTERS.intersection(cell):
                cell = '"' + cell.replace('"', '""') + '"'
            cells.append(cell)
        else:
            cells.append(repr(cell) if isinstance(cell, float) else str(cell))
    return ",".join(cells) + "\r\n"


class CsvWriter:
    """csv.writer's writerow over a text handle, with csv_line's escaping and quoting."""

    def __init__(self, handle):
        self.handle = handle

    def writerow(self, values: Iterable[Any]) -> None:
        self.handle.write(csv_line(values))


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]],
              option: Optional[str] = OUT_OPTION) -> Path:
    """A CSV file (header, then rows) written atomically, every row through csv_line."""
    buffer = io.StringIO(newline="")
    writer = CsvWriter(buffer)
    writer.writerow(header)
    for row in rows:
        writer.writerow(row)
    return write_text(path, buffer.getvalue(), option)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_folder(folder: Path) -> None:
    """Make the rename itself durable where the platform allows it (best effort: never fatal)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
