"""The caption string-match audit (Birhane, Prabhu & Kahembwe 2021, Table 1) over LAION-style parquet files.

For each search term: how many captions contain it, and how many of those rows also contain an NSFW term
in their caption or URL. DuckDB reads the files in one streaming pass (all terms at once) under a fixed
memory limit, so a 400-million-row release is audited without loading it.

Definitions (the README and the CLI help repeat them):
  match      lower(TEXT) contains lower(term) as a literal substring ('%', '_', '*' have no special meaning).
  nsfw hit   lower(TEXT) or lower(URL) contains any lower(NSFW term); in an NSFW term '*' stands for
             exactly one character (so 'f*ck' matches 'fuck', 'f*ck', 'fück'); '%' and '_' are literal.
  n_match    number of rows that match the term.
  n_nsfw     number of matching rows that are also an nsfw hit.
  pct_nsfw   100 * n_nsfw / n_match (None when n_match is 0).
  nsfw_flag_counts  value counts of the NSFW column among the matching rows; a null value (or a file
             without the column) is counted under the key NULL_FLAG.
lower() is DuckDB's: every code point is mapped to its simple Unicode lowercase ('É'->'é', 'İ'->'i',
'Σ'->'σ', 'ẞ'->'ß'); there is no full case folding, so 'ß' does not match 'ss' and accents are kept
('e' does not match 'é').
"""
from __future__ import annotations

import glob
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import pyarrow.parquet as pq

from ..errors import DatasetError, NeurolensError
from ..labels.lexicon import default_terms, re2_pattern, read_list
from ..storage.files import write_csv as write_rows

TEXT_COLUMN = "TEXT"
URL_COLUMN = "URL"
FLAG_COLUMN = "NSFW"
NULL_FLAG = "<null>"
DEFAULT_MEMORY_LIMIT = "1GB"


@dataclass(frozen=True)
class TermAudit:
    """One row of the paper's Table 1."""
    term: str
    n_match: int
    n_nsfw: int
    pct_nsfw: Optional[float]
    nsfw_flag_counts: Dict[str, int]

    def as_dict(self) -> dict:
        return dict(term=self.term, n_match=self.n_match, n_nsfw=self.n_nsfw, pct_nsfw=self.pct_nsfw,
                    nsfw_flag_counts=dict(self.nsfw_flag_counts))


@dataclass
class AuditResult:
    terms: List[TermAudit]
    nsfw_terms: List[str]
    rows: int                                   # rows read from the usable files
    files: List[str]                            # the files that were read
    skipped: List[Tuple[str, str]] = field(default_factory=list)      # (file, why) unreadable files
    absent_columns: Dict[str, List[str]] = field(default_factory=dict)  # optional column -> files without it


def parse_terms(value: str | Sequence[str] | None) -> List[str]:
    """A comma-separated string, a path to a term file, or a list -> the distinct non-empty terms, in order."""
    if value is None:
        return default_terms()   # the paper's seven: porn, hot, adult, xxx, sex, f*ck, rape
    if isinstance(value, str):
        items = read_list(value) if os.path.isfile(value) else value.split(",")
    else:
        items = list(value)
    seen: Dict[str, None] = {}
    for item in items:
        item = item.strip()
        if item:
            seen.setdefault(item, None)
    return list(seen)


def expand_sources(sources: Iterable[str]) -> List[str]:
    """Paths, directories (their *.parquet files) and glob patterns -> sorted distinct parquet files."""
    files: Dict[str, None] = {}
    for source in sources:
        source = os.path.expanduser(source)
        if os.path.isdir(source):
            found = sorted(glob.glob(os.path.join(source, "*.parquet")))
        elif any(ch in source for ch in "*?["):
            found = sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p))
        elif os.path.isfile(source):
            found = [source]
        else:
            raise DatasetError(f"{source} does not exist; give parquet files, a folder of them, or a glob such as 'data/*.parquet'")
        if not found:
            raise DatasetError(f"{source} matched no parquet files; check the path or the glob")
        for path in found:
            files.setdefault(os.path.abspath(path), None)
    return list(files)


def _file_columns(path: str) -> List[str]:
    """Column names from the parquet footer (reads no data)."""
    return list(pq.read_schema(path).names)


def _like_literal(text: str) -> str:
    r"""Escape LIKE's special characters so that they match themselves (escape character '\')."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def nsfw_like_pattern(term: str) -> str:
    """A lowercase LIKE pattern that finds the NSFW term anywhere, with '*' as exactly one character."""
    return "%" + "_".join(_like_literal(part) for part in term.split("*")) + "%"


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def build_query(terms: Sequence[str], nsfw_patterns: Sequence[str], has_url: bool, has_flag: bool) -> str:
    """One aggregate query over read_parquet($1): per NSFW-flag value, every term's match and nsfw counts.

    Parameter $1 is the file list. Terms and patterns are inlined as escaped SQL string literals (so that
    lower() of them is folded to a constant); a term is compared with contains(), a literal substring
    test. Shaped for speed: lower(TEXT) is computed once per row in a projection
    (a WHERE clause would be rewritten to repeat it per term), and the NSFW test, including lower(URL),
    runs only on rows that match some term (CASE evaluates its branch on the selected rows only)."""
    url = f'CAST("{URL_COLUMN}" AS VARCHAR)' if has_url else "CAST(NULL AS VARCHAR)"
    flag = f'CAST("{FLAG_COLUMN}" AS VARCHAR)' if has_flag else "CAST(NULL AS VARCHAR)"
    n_terms = len(terms)
    matches = ", ".join(f"contains(t, lower({_sql_string(term)})) AS m{i}" for i, term in enumerate(terms))
    any_match = " OR ".join(f"m{i}" for i in range(n_terms))
    # The patterns go through DuckDB's lower() too, so text and term are lowercased by the same function.
    nsfw_any = " OR ".join(
        f"t LIKE lower({_sql_string(p)}) ESCAPE '\\' OR lower(u) LIKE lower({_sql_string(p)}) ESCAPE '\\'"
        for p in nsfw_patterns) or "false"
    counts = ",\n  ".join(f"count(*) FILTER (WHERE m{i}) AS match_{i}, count(*) FILTER (WHERE m{i} AND nsfw) AS nsfw_{i}"
                          for i in range(n_terms))
    return f"""
SELECT flag, count(*) AS n_rows,
  {counts}
FROM (
  SELECT flag, {", ".join(f"m{i}" for i in range(n_terms))},
    coalesce(CASE WHEN {any_match} THEN ({nsfw_any}) ELSE false END, false) AS nsfw
  FROM (
    SELECT flag, t, u, {matches}
    FROM (
      SELECT {flag} AS flag, lower(CAST("{TEXT_COLUMN}" AS VARCHAR)) AS t, {url} AS u
      FROM read_parquet($1, union_by_name = true)
    )
  )
)
GROUP BY flag
"""


def audit_captions(
    sources: Sequence[str],
    terms: Sequence[str],
    nsfw_terms: str | Sequence[str] | None = None,
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    threads: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> AuditResult:
    """The paper's Table 1 for `terms` over LAION-style parquet files (paths, folders or globs).

    One DuckDB pass over all files computes every term's counts. Files whose footer cannot be read are
    skipped and listed in `skipped`; a file without a TEXT column (any letter case) is an error naming the file; files
    without URL or NSFW are read as if those values were null and listed in `absent_columns`.
    `progress(done, 1000)` reports DuckDB's own progress estimate while the query runs."""
    import duckdb  # lazy: the CLI imports this module at start-up; duckdb only when an audit runs

    search = parse_terms(list(terms))
    if not search:
        raise NeurolensError("no search terms; pass at least one --term")
    nsfw = parse_terms(nsfw_terms)
    if not nsfw:
        raise NeurolensError("no NSFW terms; pass --nsfw-terms with comma-separated terms, or leave it out for the paper's 7")
    files = expand_sources(sources)

    usable: List[str] = []
    skipped: List[Tuple[str, str]] = []
    absent: Dict[str, List[str]] = {URL_COLUMN: [], FLAG_COLUMN: []}
    for path in files:
        try:
            columns = _file_columns(path)
        except Exception as exc:  # pyarrow raises several types for a damaged or non-parquet file
            skipped.append((path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
            continue
        upper = {name.upper() for name in columns}   # DuckDB binds column names case-insensitively
        if TEXT_COLUMN not in upper:
            raise DatasetError(f"{path} has no {TEXT_COLUMN} column (it has: {', '.join(columns) or 'none'}); "
                               f"audit-captions needs the caption in a column named {TEXT_COLUMN}")
        for name in absent:
            if name not in upper:
                absent[name].append(path)
        usable.append(path)
    if not usable:
        raise DatasetError(f"none of the {len(files)} file(s) could be read as parquet "
                           f"(first: {skipped[0][0]}: {skipped[0][1]})")

    has_url = len(absent[URL_COLUMN]) < len(usable)
    has_flag = len(absent[FLAG_COLUMN]) < len(usable)
    query = build_query(search, [nsfw_like_pattern(t) for t in nsfw], has_url, has_flag)

    con = duckdb.connect(config={"memory_limit": memory_limit,
                                 "threads": threads or max(1, min(4, os.cpu_count() or 1)),
                                 "preserve_insertion_order": False})
    try:
        rows = _run_with_progress(con, query, [usable], progress)
    except duckdb.Error as exc:
        raise DatasetError(f"DuckDB could not read the files: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()

    total_rows = sum(int(row[1]) for row in rows)
    results = []
    for i, term in enumerate(search):
        n_match = sum(int(row[2 + 2 * i]) for row in rows)
        n_nsfw = sum(int(row[3 + 2 * i]) for row in rows)
        flags = {(NULL_FLAG if row[0] is None else row[0]): int(row[2 + 2 * i]) for row in rows if row[2 + 2 * i]}
        flags = dict(sorted(flags.items(), key=lambda kv: (-kv[1], kv[0])))
        pct = 100.0 * n_nsfw / n_match if n_match else None
        results.append(TermAudit(term, n_match, n_nsfw, pct, flags))
    return AuditResult(terms=results, nsfw_terms=nsfw, rows=total_rows, files=usable, skipped=skipped,
                       absent_columns={k: v for k, v in absent.items() if v})


@dataclass(frozen=True)
class ConceptPrevalence:
    """How many caption rows of a training set show one concept by its caption lexicon."""
    concept: str
    n_match: int
    rows: int

    @property
    def prevalence(self) -> Optional[float]:
        return self.n_match / self.rows if self.rows else None


def concept_prevalence(sources: Sequence[str], lexicons: Sequence[Tuple[str, Sequence[str], str]],
                       text_column: Optional[str] = None, memory_limit: str = DEFAULT_MEMORY_LIMIT,
                       threads: Optional[int] = None) -> List[ConceptPrevalence]:
    """Per concept (name, terms, match mode), the caption rows of parquet/CSV files that match its lexicon,
    in one DuckDB pass: the caption audit of a concept set (`compare --train-captions`).

    A row matches a concept when lower(caption) contains one of its terms as neurolens.labels.lexicon matches
    captions ('word', 'exact' or 'substring'; labels.lexicon.re2_pattern), the same rule that labels the probe
    images. text_column: the caption column (default: TEXT, any letter case, else `caption`). Rows with a null
    caption count as rows that match nothing."""
    import duckdb  # lazy: the CLI imports this module at start-up; duckdb only when an audit runs

    files = _caption_files(sources)
    column = text_column or _text_column(files[0])
    for path in files:
        names = {name.lower(): name for name in _columns_of(path)}
        if column.lower() not in names:
            raise DatasetError(f"{path} has no caption column {column!r} (it has: {', '.join(names.values())}); "
                               f"name it with LABEL=PATH:COLUMN")
    if not lexicons:
        return []
    counts = ",\n  ".join(f"count(*) FILTER (WHERE coalesce(regexp_matches(t, {_sql_string(re2_pattern(terms, mode))}),"
                          f" false)) AS c{i}" for i, (_, terms, mode) in enumerate(lexicons))
    reader = "read_csv_auto($1, union_by_name = true)" if files[0].lower().endswith((".csv", ".tsv")) else \
        "read_parquet($1, union_by_name = true)"
    quoted = column.replace('"', '""')
    query = f'SELECT count(*) AS n_rows, {counts} FROM (SELECT lower(CAST("{quoted}" AS VARCHAR)) AS t FROM {reader})'
    con = duckdb.connect(config={"memory_limit": memory_limit,
                                 "threads": threads or max(1, min(4, os.cpu_count() or 1))})
    try:
        row = con.execute(query, [files]).fetchone()
    except duckdb.Error as exc:
        raise DatasetError(f"DuckDB could not read the caption files: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()
    return [ConceptPrevalence(name, int(row[1 + i]), int(row[0])) for i, (name, _, _) in enumerate(lexicons)]


def _caption_files(sources: Sequence[str]) -> List[str]:
    """Parquet files as audit-captions takes them (paths, folders, globs), or CSV/TSV tables named one by one."""
    tables = [s for s in sources if str(s).lower().endswith((".csv", ".tsv"))]
    if tables and len(tables) < len(sources):
        raise NeurolensError("give the training captions as parquet files or as CSV tables, not both")
    if tables:
        for table in tables:
            if not os.path.isfile(table):
                raise DatasetError(f"{table} does not exist; give the training captions as a parquet or CSV file")
        return [os.path.abspath(t) for t in tables]
    return expand_sources(sources)


def _columns_of(path: str) -> List[str]:
    if path.lower().endswith((".csv", ".tsv")):
        with open(path, encoding="utf-8", errors="replace") as handle:
            header = handle.readline()
        return [name.strip().strip('"') for name in header.rstrip("\r\n").split("\t" if path.lower().endswith(".tsv")
                                                                                  else ",")]
    try:
        return _file_columns(path)
    except Exception as exc:  # pyarrow raises several types for a damaged or non-parquet file
        raise DatasetError(f"{path} could not be read as parquet: {type(exc).__name__}") from None


def _text_column(path: str) -> str:
    """TEXT (any letter case, the LAION layout), else caption (neurolens's tables and the toy data)."""
    names = {name.lower(): name for name in _columns_of(path)}
    for wanted in (TEXT_COLUMN.lower(), "caption"):
        if wanted in names:
            return names[wanted]
    raise DatasetError(f"{path} has neither a {TEXT_COLUMN} nor a caption column (it has: "
                       f"{', '.join(names.values()) or 'none'}); name the caption column with LABEL=PATH:COLUMN")


def _run_with_progress(con, query: str, params: list, progress: Optional[Callable[[int, int], None]]):
    """Execute and fetch; while it runs, a watcher thread reports con.query_progress() to the callback."""
    if progress is None:
        return con.execute(query, params).fetchall()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.25):
            try:
                fraction = con.query_progress()
            except Exception:  # progress is best-effort; the query result is what matters
                return
            if fraction is not None and fraction >= 0:
                progress(int(min(fraction, 100.0) * 10), 1000)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        rows = con.execute(query, params).fetchall()
    finally:
        done.set()
        watcher.join()
    progress(1000, 1000)
    return rows


def write_csv(result: AuditResult, path: str | os.PathLike) -> Path:
    """term,n_match,n_nsfw,pct_nsfw,nsfw_flag_counts (the last as a JSON object), one row per term."""
    rows = ([row.term, row.n_match, row.n_nsfw, None if row.pct_nsfw is None else float(f"{row.pct_nsfw:.6g}"),
             json.dumps(row.nsfw_flag_counts, ensure_ascii=False)] for row in result.terms)
    return write_rows(path, ["term", "n_match", "n_nsfw", "pct_nsfw", "nsfw_flag_counts"], rows, option="--csv")
