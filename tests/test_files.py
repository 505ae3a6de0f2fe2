"""neurolens.storage.files: whole-or-nothing writes, one clear error on a failing disk, formula-safe CSV cells."""
import csv
import errno

import numpy as np
import pytest
from PIL import Image

from neurolens.storage import files
from neurolens.errors import NeurolensError
from neurolens.storage.cache import Cache, Record


def test_write_replaces_whole_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    files.write_bytes(target, b"first")
    files.write_bytes(target, b"second version")
    assert target.read_bytes() == b"second version"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]


@pytest.mark.parametrize("error_number,words", [(errno.ENOSPC, "no space left"), (errno.EDQUOT, "quota"),
                                                (errno.EROFS, "read-only"), (errno.EACCES, "permission denied")])
def test_a_failing_disk_keeps_the_old_file_removes_the_partial_one_and_says_what_to_do(
        tmp_path, monkeypatch, full_disk, error_number, words):
    target = tmp_path / "record.h5"
    target.write_bytes(b"old content")
    full_disk(keep=3, error=error_number)
    with pytest.raises(files.WriteError) as caught:
        files.write_bytes(target, b"new content that does not fit", option="--cache")
    message = str(caught.value)
    assert isinstance(caught.value, NeurolensError)
    assert str(target) in message and words in message and "--cache" in message and "\n" not in message
    if error_number == errno.ENOSPC:
        assert "free some space" in message
    assert caught.value.errno == error_number
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.h5"]


def test_an_interrupted_write_removes_the_partial_file(tmp_path):
    target = tmp_path / "x.txt"
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(files.WriteError) as caught:
        files.write_text(blocker / "inside" / "a.txt", "x", option="--out")
    assert "cannot create the folder" in str(caught.value) and "--out" in str(caught.value)


def test_png_round_trip(tmp_path):
    image = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    path = files.save_png(image, tmp_path / "a.png")
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))


def test_csv_cells_are_escaped_against_formulas_and_numbers_stay_numbers(tmp_path):
    rows = [["=HYPERLINK(\"http://x\")", "+1", "-cmd", "@SUM(A1)", "\tx", "\rx", "plain", "a=b"],
            [-0.25, 3, np.float32(-1.5), np.int64(-7), True, None, float("nan"), "-"]]
    path = files.write_csv(tmp_path / "t.csv", ["h1", "h2", "h3", "h4", "h5", "h6", "h7", "h8"], rows)
    with open(path, newline="", encoding="utf-8") as handle:
        read = list(csv.reader(handle))
    assert read[1] == ["'=HYPERLINK(\"http://x\")", "'+1", "'-cmd", "'@SUM(A1)", "'\tx", "'\rx", "plain", "a=b"]
    assert read[2] == ["-0.25", "3", "-1.5", "-7", "1", "", "nan", "'-"]


def test_csv_cells_with_a_separator_or_formula_anywhere_are_quoted(tmp_path):
    """`cat;=1+1` must stay one cell starting with `c` in a spreadsheet that splits on `;` (issue 20)."""
    rows = [["cat;=1+1", "a,b", "tab\there", "pipe|=2", 'say "hi"', "line\n=break", "x+y", "plain", " =SUM(A1)"],
            [1, 2.5, None, True, "", "-", "@", "ok", 3]]
    path = files.write_csv(tmp_path / "t.csv", ["h1", "h2", "h3", "h4", "h5", "h6", "h7", "h8", "h9"], rows)
    text = path.read_text(encoding="utf-8")
    assert '"cat;\'=1+1"' in text and '"pipe|\'=2"' in text and '"x+y"' in text and ',plain,' in text
    assert text.splitlines()[0] == "h1,h2,h3,h4,h5,h6,h7,h8,h9"
    for separator in (";", "|", "\t"):         # a spreadsheet splitting on another separator: no cell is a formula
        with open(path, newline="", encoding="utf-8") as handle:
            cells = [c.strip(' "') for row in csv.reader(handle, delimiter=separator) for c in row]
        assert cells and not any(c.startswith(("=", "+", "-", "@")) for c in cells), (separator, cells)
    with open(path, newline="", encoding="utf-8") as handle:
        read = list(csv.reader(handle))
    assert read[1] == ["cat;'=1+1", "a,b", "tab\there", "pipe|'=2", 'say "hi"', "line\n'=break", "x+y", "plain",
                       "' =SUM(A1)"]
    assert read[2] == ["1", "2.5", "", "1", "", "'-", "'@", "ok", "3"]


def test_cache_record_round_trip_and_no_temporary_files(tmp_path):
    cache = Cache(tmp_path)
    path = cache.path("kind", "f" * 40, "layer", "key")
    record = Record(arrays={"a": np.arange(10000, dtype=np.float32), "nested/b": np.array(["x", "yz"], dtype=object),
                            "c": np.zeros((2, 3), bool)}, attrs={"n": 3, "names": ["p", "q"]})
    cache.write(path, record)
    back = cache.read(path)
    assert np.array_equal(back.arrays["a"], record.arrays["a"])
    assert list(back.arrays["nested/b"]) == ["x", "yz"] and back.arrays["c"].shape == (2, 3)
    assert back.attrs == {"n": 3, "names": ["p", "q"]}
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_cache_write_on_a_full_disk_raises_one_line_and_keeps_older_records(tmp_path, monkeypatch, full_disk):
    cache = Cache(tmp_path)
    done = cache.path("kind", "f" * 40, "layer", "done")
    cache.write(done, Record(arrays={"a": np.ones(3)}, attrs={}))
    full_disk(keep=100)
    failing = cache.path("kind", "f" * 40, "layer", "next")
    with pytest.raises(files.WriteError, match="no space left.*--cache"):
        cache.write(failing, Record(arrays={"a": np.ones(5000)}, attrs={}))
    monkeypatch.undo()
    assert not failing.exists() and [p.name for p in done.parent.iterdir()] == [done.name]
    assert np.array_equal(cache.read(done).arrays["a"], np.ones(3))
