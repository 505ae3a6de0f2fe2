"""audit-captions on generated parquet files whose answers are counted by hand."""
import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from neurolens.audit.captions import (NULL_FLAG, audit_captions, build_query, nsfw_like_pattern, parse_terms)
from neurolens.labels.lexicon import default_terms as default_nsfw_terms
from neurolens.cli import app
from neurolens.errors import NeurolensError

# (TEXT, URL, NSFW) -- every row's role in the expected counts is written next to it.
FULL_ROWS = [
    ("Desi bride in red", "http://a.com/1.jpg", "UNLIKELY"),        # desi
    ("DESI GIRL hot pics", "http://a.com/2.jpg", "NSFW"),           # desi, nsfw (hot, upper case)
    ("desi nun costume", "http://a.com/x/adult/3.jpg", "UNSURE"),   # desi + nun overlap, nsfw only via URL
    ("a nun praying", "http://a.com/4.jpg", "UNLIKELY"),            # nun
    ("Nun with a f.ck sign", None, None),                           # nun, nsfw via f*ck wildcard, null URL + flag
    ("nun fck", "http://a.com/6.jpg", "UNLIKELY"),                  # nun, 'fck' is not f*ck (needs one character)
    (None, "http://desi.com/porn.jpg", "NSFW"),                     # null TEXT: matches nothing
    ("landscape", "http://desi-nun.com/7.jpg", "UNLIKELY"),         # terms only in URL: not a match
    ("LATINA SINGER", "http://a.com/8.jpg", "UNLIKELY"),            # latina (upper case text)
    ("latina photo", "http://a.com/9.jpg", "UNSURE"),               # latina, nsfw: 'photo' contains 'hot'
    ("Fück the desi rules", "http://a.com/10.jpg", "NSFW"),         # desi, nsfw: f*ck with a non-ASCII ü
    ("ÉCOLE latina", "http://a.com/11.jpg", "UNLIKELY"),            # latina, école (É lowercased)
    ("100% desi_style", "http://a.com/12.jpg", None),               # desi, '100%', 'desi_style'
    ("100 percent desixstyle", "http://a.com/13.jpg", "UNLIKELY"),  # desi only: % and _ are literal
]
# A second file without the optional URL and NSFW columns.
TEXT_ONLY_ROWS = ["desi xxx", "NUN", "İstanbul latina", "Straße", "STRASSE", "It's raining"]


@pytest.fixture()
def laion(tmp_path):
    text, url, flag = zip(*FULL_ROWS)
    n = len(FULL_ROWS)
    pq.write_table(pa.table({
        "SAMPLE_ID": pa.array(range(n), pa.int64()), "URL": pa.array(url, pa.string()),
        "TEXT": pa.array(text, pa.string()), "LICENSE": pa.array(["?"] * n), "NSFW": pa.array(flag, pa.string()),
        "similarity": pa.array([0.31] * n), "WIDTH": pa.array([256] * n), "HEIGHT": pa.array([256] * n),
    }), tmp_path / "part-00000.parquet", row_group_size=4)
    pq.write_table(pa.table({"SAMPLE_ID": list(range(len(TEXT_ONLY_ROWS))), "TEXT": TEXT_ONLY_ROWS}),
                   tmp_path / "part-00001.parquet")
    (tmp_path / "part-00002.parquet").write_bytes(b"not a parquet file")
    return tmp_path


EXPECTED = {
    # term: (n_match, n_nsfw, flag counts)
    "desi": (7, 4, {"UNLIKELY": 2, "NSFW": 2, "UNSURE": 1, NULL_FLAG: 2}),
    "nun": (5, 2, {"UNLIKELY": 2, "UNSURE": 1, NULL_FLAG: 2}),
    "Latina": (4, 1, {"UNLIKELY": 2, "UNSURE": 1, NULL_FLAG: 1}),
    "école": (1, 0, {"UNLIKELY": 1}),
    "istanbul": (1, 0, {NULL_FLAG: 1}),
    "straße": (1, 0, {NULL_FLAG: 1}),
    "100%": (1, 0, {NULL_FLAG: 1}),
    "desi_style": (1, 0, {NULL_FLAG: 1}),
    "zebra": (0, 0, {}),
    "it's": (1, 0, {NULL_FLAG: 1}),  # a quote in a term is data, not SQL
}


def _check(rows):
    assert [r["term"] for r in rows] == list(EXPECTED)
    for row in rows:
        n_match, n_nsfw, flags = EXPECTED[row["term"]]
        assert (row["n_match"], row["n_nsfw"], row["nsfw_flag_counts"]) == (n_match, n_nsfw, flags), row["term"]
        assert row["pct_nsfw"] == (pytest.approx(100 * n_nsfw / n_match) if n_match else None)


def test_known_answers_through_the_api(laion):
    result = audit_captions([str(laion / "*.parquet")], list(EXPECTED))
    _check([r.as_dict() for r in result.terms])
    assert result.rows == len(FULL_ROWS) + len(TEXT_ONLY_ROWS)
    assert [p for p, _ in result.skipped] == [str(laion / "part-00002.parquet")]
    assert result.absent_columns == {"URL": [str(laion / "part-00001.parquet")],
                                     "NSFW": [str(laion / "part-00001.parquet")]}
    assert result.nsfw_terms == ["porn", "hot", "adult", "xxx", "sex", "f*ck", "rape"]


def test_cli_json_csv_and_table(laion, tmp_path):
    runner = CliRunner()
    args = ["audit-captions", str(laion / "part-0000*.parquet")]
    for term in EXPECTED:
        args += ["--term", term]
    result = runner.invoke(app, args + ["--json", "--csv", str(tmp_path / "out" / "t1.csv")])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert all(set(r) == {"term", "n_match", "n_nsfw", "pct_nsfw", "nsfw_flag_counts"} for r in rows)
    _check(rows)
    with open(tmp_path / "out" / "t1.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["term"], int(r["n_match"]), int(r["n_nsfw"])) for r in table] == \
        [(t, v[0], v[1]) for t, v in EXPECTED.items()]
    assert json.loads(table[0]["nsfw_flag_counts"]) == EXPECTED["desi"][2]

    text = runner.invoke(app, args)
    assert text.exit_code == 0
    assert "20 rows in 2 file(s) (1 skipped)" in text.stdout
    assert "desi" in text.stdout and "57.14" in text.stdout  # 100 * 4 / 7


def test_custom_nsfw_terms_and_files_without_url(laion):
    # With only 'xxx' as the NSFW term, 'desi xxx' (second file, no URL column) is the only desi hit.
    result = audit_captions([str(laion / "part-00000.parquet"), str(laion / "part-00001.parquet")],
                            ["desi"], nsfw_terms="xxx")
    assert (result.terms[0].n_match, result.terms[0].n_nsfw) == (7, 1)
    # Only the second file: URL and NSFW are absent everywhere, so every flag is null.
    only = audit_captions([str(laion / "part-00001.parquet")], ["desi", "nun"])
    assert [(t.n_match, t.n_nsfw, t.nsfw_flag_counts) for t in only.terms] == \
        [(1, 1, {NULL_FLAG: 1}), (1, 0, {NULL_FLAG: 1})]


def test_missing_text_column_is_a_clear_error(tmp_path):
    bad = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"URL": ["http://x"], "CAPTION": ["desi"]}), bad)
    with pytest.raises(NeurolensError, match=r"meta\.parquet has no TEXT column"):
        audit_captions([str(bad)], ["desi"])
    result = CliRunner().invoke(app, ["audit-captions", str(bad), "--term", "desi"])
    assert result.exit_code == 2
    assert "TEXT" in result.output and "meta.parquet" in result.output and "Traceback" not in result.output


def test_bad_sources_and_terms(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["audit-captions", str(tmp_path / "nope.parquet"), "--term", "x"])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    empty_glob = runner.invoke(app, ["audit-captions", str(tmp_path / "*.parquet"), "--term", "x"])
    assert empty_glob.exit_code == 2 and "matched no parquet files" in empty_glob.output
    (tmp_path / "broken.parquet").write_bytes(b"xx")
    broken = runner.invoke(app, ["audit-captions", str(tmp_path / "broken.parquet"), "--term", "x"])
    assert broken.exit_code == 2 and "could be read" in broken.output


def test_terms_patterns_and_single_pass():
    assert default_nsfw_terms() == ["porn", "hot", "adult", "xxx", "sex", "f*ck", "rape"]
    assert parse_terms("a, b,,a") == ["a", "b"]
    assert nsfw_like_pattern("f*ck") == "%f_ck%"
    assert nsfw_like_pattern("50%_off\\") == "%50\\%\\_off\\\\%"
    query = build_query(["desi", "o'neil", "x"], ["%porn%", "%it's%"], has_url=True, has_flag=True)
    assert query.count("read_parquet(") == 1 and "it''s" in query and "o''neil" in query


def test_column_names_in_any_case(tmp_path):
    pq.write_table(pa.table({"text": ["Desi a", "nun"], "url": ["http://x/xxx", None]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"Text": ["desi b"], "nsfw": ["NSFW"]}), tmp_path / "b.parquet")
    result = audit_captions([str(tmp_path)], ["desi"])
    assert result.terms[0].as_dict() == dict(term="desi", n_match=2, n_nsfw=1, pct_nsfw=50.0,
                                             nsfw_flag_counts={NULL_FLAG: 1, "NSFW": 1})
