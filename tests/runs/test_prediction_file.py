"""runs.prediction_file, Task 1: FileName,EmoClass files (optional prob_<code> columns) written and
read back, and every kind of bad file refused with one line naming the file and the line."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from ser_cache.runs.prediction_file import read_class_predictions, write_class_predictions
from ser_cache.system.tasks import CLASSES_8, class_codes

IDS = ["MSP-PODCAST_test3_0001.wav", "MSP-PODCAST_test3_0002.wav", "MSP-PODCAST_test3_0003.wav"]


def distributions(n: int, c: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).random((n, c))
    return x / x.sum(1, keepdims=True)


def lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_codes_alone_round_trip_in_the_submission_format(tmp_path):
    path = write_class_predictions(tmp_path / "p.csv", IDS, ["A", "N", "C"])
    assert lines(path) == ["FileName,EmoClass", f"{IDS[0]},A", f"{IDS[1]},N", f"{IDS[2]},C"]
    ids, codes, probs, classes = read_class_predictions(path)
    assert (ids, codes, probs, classes) == (IDS, ["A", "N", "C"], None, CLASSES_8)


@pytest.mark.parametrize("n", [8, 9])
def test_probabilities_round_trip_one_column_per_class_in_the_run_order(tmp_path, n):
    classes = class_codes(n)
    p = distributions(3, n)
    codes = [classes[k] for k in p.argmax(1)]
    path = write_class_predictions(tmp_path / "p.csv", IDS, codes, p, classes=classes)
    header = next(csv.reader(open(path)))
    assert header == ["FileName", "EmoClass", *(f"prob_{c}" for c in classes)]
    ids, got_codes, got, got_classes = read_class_predictions(path)
    assert ids == IDS and got_codes == codes and got_classes == classes
    np.testing.assert_allclose(got, p, atol=1e-6)
    # a reader that expects the run's classes gets them; another class set is refused
    assert read_class_predictions(path, classes=classes)[3] == classes
    other = class_codes(17 - n)
    with pytest.raises(ValueError, match=f"probability columns are for the classes {','.join(classes)}, expected"):
        read_class_predictions(path, classes=other)


def test_a_nine_class_file_without_probabilities_is_read_with_nine_classes(tmp_path):
    path = write_class_predictions(tmp_path / "p.csv", IDS, ["O", "A", "N"], classes=class_codes(9))
    with pytest.raises(ValueError, match=r"line 2 \(MSP-PODCAST_test3_0001.wav\): EmoClass is 'O', expected one of "
                                         "A, S, H, U, F, D, C, N$"):
        read_class_predictions(path)
    assert read_class_predictions(path, classes=class_codes(9))[1] == ["O", "A", "N"]


@pytest.mark.parametrize("change, message", [
    (lambda c, p: (["A", "X", "N"], p), r"the class of MSP-PODCAST_test3_0002.wav \(row 2\) is 'X', expected one of"),
    (lambda c, p: (["A", "O", "N"], p), r"is 'O', expected one of A, S, H, U, F, D, C, N$"),
    (lambda c, p: (c, p * 1.01), r"row 1 \(MSP-PODCAST_test3_0001.wav\): the probabilities sum to 1.01, not 1"),
    (lambda c, p: (c, np.where(np.arange(8) == 0, np.nan, p)), "row 1 .*: a probability is not a finite number"),
    (lambda c, p: (c, np.tile([1.5, -0.5, 0, 0, 0, 0, 0, 0], (3, 1))), r"lies outside \[0, 1\] \(1.5, -0.5"),
    (lambda c, p: (c, p[:, :7]), r"probabilities must be \(3, 8\), got \(3, 7\)"),
    (lambda c, p: (c[:2], p), "2 class code.* for 3 id"),
])
def test_the_writer_refuses_bad_values_and_writes_nothing(tmp_path, change, message):
    p = distributions(3, 8)
    codes, probs = change(["A", "S", "N"], p)
    with pytest.raises(ValueError, match=message):
        write_class_predictions(tmp_path / "p.csv", IDS, codes, probs)
    assert not (tmp_path / "p.csv").exists()


def test_the_writer_refuses_a_repeated_id_and_a_class_order_no_run_has(tmp_path):
    with pytest.raises(ValueError, match="MSP-PODCAST_test3_0001.wav is listed twice"):
        write_class_predictions(tmp_path / "p.csv", [IDS[0], IDS[0]], ["A", "S"])
    with pytest.raises(ValueError, match="classes N,A: expected a run's class order"):
        write_class_predictions(tmp_path / "p.csv", IDS[:1], ["A"], classes=("N", "A"))


HEADER = "FileName,EmoClass," + ",".join(f"prob_{c}" for c in CLASSES_8)
ROW = ",0.300000,0.100000,0.100000,0.100000,0.100000,0.100000,0.100000,0.100000"


@pytest.mark.parametrize("text, message", [
    ("FileName,Emotion\na.wav,A\n", r"line 1: header is 'FileName,Emotion', expected FileName,EmoClass, optionally"),
    ("FileName,EmoAct,EmoVal,EmoDom\na.wav,1,2,3\n", "line 1: header is 'FileName,EmoAct,EmoVal,EmoDom'"),
    ("", "line 1: header is '', expected"),
    ("FileName,EmoClass,prob_N,prob_A\na.wav,A,0.5,0.5\n", r"in the run's class order"),
    ("FileName,EmoClass\na.wav,A\nb.wav,Q\n", r"line 3 \(b.wav\): EmoClass is 'Q', expected one of A, S"),
    ("FileName,EmoClass\na.wav,A\nb.wav,a\n", r"line 3 \(b.wav\): EmoClass is 'a'"),
    ("FileName,EmoClass\na.wav,A\na.wav,S\n", r"line 3: a.wav is listed twice \(first on line 2\)"),
    ("FileName,EmoClass\na.wav,A,extra\n", r"line 2: 3 field\(s\), expected 2 \(FileName,EmoClass\)"),
    ("FileName,EmoClass\n,A\n", "line 2: empty FileName"),
    (f"{HEADER}\na.wav,A{ROW}\nb.wav,A{ROW.replace('0.3', '0.4')}\n",
     r"line 3 \(b.wav\): the probabilities sum to 1.1"),
    (f"{HEADER}\na.wav,A{ROW.replace('0.300000', 'nan')}\n", r"line 2 \(a.wav\): a probability is not a finite"),
    (f"{HEADER}\na.wav,A{ROW.replace('0.300000', '1.3').replace(',0.100000', ',-0.1', 3)}\n",
     r"line 2 \(a.wav\): a probability lies outside \[0, 1\]"),
    (f"{HEADER}\na.wav,A{ROW.replace('0.300000', 'high')}\n", r"line 2 \(a.wav\): prob_A is 'high', expected a number"),
])
def test_the_reader_refuses_each_problem_naming_file_and_line(tmp_path, text, message):
    path = tmp_path / "p.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        read_class_predictions(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_a_good_file_with_a_byte_order_mark_is_read_and_a_folder_or_nothing_is_named(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(f"\ufeff{HEADER}\na.wav,A{ROW}\n", encoding="utf-8")
    ids, codes, probs, classes = read_class_predictions(path)
    assert (ids, codes, classes) == (["a.wav"], ["A"], CLASSES_8) and probs[0, 0] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="a folder, not a prediction file"):
        read_class_predictions(tmp_path)
    with pytest.raises(ValueError, match="no such prediction file"):
        read_class_predictions(tmp_path / "none.csv")
