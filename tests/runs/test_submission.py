"""`ser-cache check-submission`: a good file passes; each kind of broken file is named, with its line."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.runs.submission import SHOWN_PER_KIND, check_submission

from factories import msp_corpus

runner = CliRunner()
HEADER = "FileName,EmoAct,EmoVal,EmoDom"


@pytest.fixture
def data(tmp_path) -> Path:
    return msp_corpus(tmp_path / "c", n=4, unlabeled=5)  # Test3: MSP-PODCAST_test3_0001..0005.wav


def ids(n: int = 5) -> list[str]:
    return [f"MSP-PODCAST_test3_{k:04d}.wav" for k in range(1, n + 1)]


def write(tmp_path: Path, lines: list[str], name: str = "sub.csv") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def good_lines() -> list[str]:
    return [HEADER] + [f"{u},{1 + k:.4f},{7 - k:.4f},{3.25 + k / 10:.4f}" for k, u in enumerate(ids())]


def check(path: Path, data: Path, *extra: str):
    r = runner.invoke(app, ["check-submission", str(path), "--data", str(data), *extra])
    return r.exit_code, " ".join(r.output.split())


@pytest.fixture(autouse=True)
def _library_logging_off():
    """Another command run earlier in the same process may have turned the library's info lines on
    (on stderr, which the runner mixes into the output); these tests read the verdict alone."""
    import logging

    logger = logging.getLogger("ser_cache")
    level, handlers = logger.level, list(logger.handlers)
    logger.handlers, logger.level = [], logging.WARNING
    yield
    logger.handlers, logger.level = handlers, level


def test_a_good_file_passes(data, tmp_path):
    code, out = check(write(tmp_path, good_lines()), data)
    assert code == 0, out
    assert out == f"OK: {tmp_path / 'sub.csv'} has the 5 rows of Test3 in the challenge format"
    code, out = check(write(tmp_path, good_lines()), data, "--split", "test3")  # split names are case-insensitive
    assert code == 0 and "rows of Test3" in out


@pytest.mark.parametrize("case, expected", [
    ("missing", ["utterances of the split without a row (1):", "MSP-PODCAST_test3_0005.wav has no row"]),
    ("extra", ["ids that are not utterances of the split (1):",
               "line 7: 'MSP-PODCAST_1000_0001.wav' is not an utterance of Test3"]),
    ("duplicate", ["ids given more than once (1):", "line 7: MSP-PODCAST_test3_0002.wav already on line 3"]),
    ("nan", ["values that are not finite numbers (1):", "line 4: EmoVal is nan, expected a finite number"]),
    ("eight", ["values outside [1, 7] (1):", "line 2: EmoAct is 8.0, outside [1, 7]"]),
    ("header", ["header (1):", "line 1: header is 'FileName,Arousal,Valence,Dominance', expected "
                               "'FileName,EmoAct,EmoVal,EmoDom'"]),
    ("fields", ["rows without 4 fields (1):", "line 3: 3 field(s), expected 4"]),
    ("word", ["line 6: EmoDom is 'high', expected a number"]),
])
def test_each_problem_is_named_with_its_line(data, tmp_path, case, expected):
    lines = good_lines()
    if case == "missing":
        lines = lines[:-1]
    elif case == "extra":
        lines.append("MSP-PODCAST_1000_0001.wav,4,4,4")
    elif case == "duplicate":
        lines.append(lines[2])
    elif case == "nan":
        lines[3] = f"{ids()[2]},4.0,nan,4.0"
    elif case == "eight":
        lines[1] = f"{ids()[0]},8.0,4.0,4.0"
    elif case == "header":
        lines[0] = "FileName,Arousal,Valence,Dominance"
    elif case == "fields":
        lines[2] = f"{ids()[1]},4.0,4.0"
    elif case == "word":
        lines[5] = f"{ids()[4]},4.0,4.0,high"
    code, out = check(write(tmp_path, lines), data)
    assert code == 1, out
    for text in expected:
        assert text in out
    assert out.endswith("REJECTED: 1 problem(s)")


def test_every_problem_is_listed_and_long_lists_are_capped(data, tmp_path):
    lines = [HEADER.lower()] + [f"{u},0.5,inf,7" for u in ids(4)] + [f"x{k}.wav,4,4,4" for k in range(25)]
    code, out = check(write(tmp_path, lines), data)
    assert code == 1
    # 1 header + 4 out of range + 4 infinite + 25 unknown + 1 missing
    assert out.endswith("REJECTED: 35 problem(s)")
    assert "ids that are not utterances of the split (25):" in out
    assert f"… and {25 - SHOWN_PER_KIND} more" in out and "'x19.wav'" in out and "'x20.wav'" not in out
    assert "MSP-PODCAST_test3_0005.wav has no row" in out


def test_a_file_without_header_and_a_byte_order_mark(data, tmp_path):
    p = write(tmp_path, good_lines()[1:])
    result = check_submission(p, data=data, split="Test3")
    assert [pr.kind for pr in result.problems] == ["header"]  # its first line still counts as a row
    p.write_bytes(b"\xef\xbb\xbf" + "\n".join(good_lines()).encode() + b"\n")
    code, out = check(p, data)
    assert code == 1 and "byte-order mark" in out


def test_usage_errors_exit_2(data, tmp_path):
    p = write(tmp_path, good_lines())
    r = runner.invoke(app, ["check-submission", str(p)])
    assert r.exit_code == 2 and "--data" in r.output
    code, out = check(p, data, "--split", "Test9")
    assert code == 2 and "--split Test9: not a split" in out
    code, out = check(tmp_path / "nope.csv", data)
    assert code == 2 and "nope.csv: no such file" in out


# Task 1 (categorical emotion): FileName,EmoClass, one of the challenge's 8 codes per file.
CLASS_HEADER = "FileName,EmoClass"


def good_class_lines() -> list[str]:
    return [CLASS_HEADER] + [f"{u},{code}" for u, code in zip(ids(), "ASHUN")]


def check_classes(path: Path, data: Path, *extra: str):
    return check(path, data, "--task", "categorical", *extra)


def test_a_good_task1_file_passes_and_is_not_a_task2_file(data, tmp_path):
    path = write(tmp_path, good_class_lines())
    code, out = check_classes(path, data)
    assert code == 0, out
    assert out == f"OK: {path} has the 5 rows of Test3 in the challenge's Task 1 format"
    code, out = check(path, data)  # the default is still Task 2
    assert code == 1 and "expected 'FileName,EmoAct,EmoVal,EmoDom'" in out
    code, out = check_classes(write(tmp_path, good_lines(), "t2.csv"), data)
    assert code == 1 and "(a Task 2 file: check it without --task categorical)" in out


def test_every_code_of_the_challenge_passes(data, tmp_path):
    lines = [CLASS_HEADER] + [f"{u},{c}" for u, c in zip(ids(), "FDC" + "NA")]
    assert check_classes(write(tmp_path, lines), data)[0] == 0


@pytest.mark.parametrize("case, expected", [
    ("other", ["classes that are not one of the 8 codes (1):", "line 3: EmoClass is 'O', expected one of A, S, H, "
                                                               "U, F, D, C, N; O (Other) and X (no agreement) are "
                                                               "not classes of Task 1"]),
    ("x", ["line 4: EmoClass is 'X', expected one of", "are not classes of Task 1"]),
    ("lower", ["line 2: EmoClass is 'a', expected one of A, S, H, U, F, D, C, N; the codes are upper case"]),
    ("space", ["line 2: EmoClass is ' A', expected one of A, S, H, U, F, D, C, N; write the code without spaces"]),
    ("word", ["line 6: EmoClass is 'Neutral', expected one of"]),
    ("empty", ["line 6: EmoClass is '', expected one of"]),
    ("missing", ["utterances of the split without a row (1):", "MSP-PODCAST_test3_0005.wav has no row"]),
    ("extra", ["ids that are not utterances of the split (1):",
               "line 7: 'MSP-PODCAST_1000_0001.wav' is not an utterance of Test3"]),
    ("duplicate", ["ids given more than once (1):", "line 7: MSP-PODCAST_test3_0002.wav already on line 3"]),
    ("header", ["header (1):", "line 1: header is 'FileName,Emotion', expected 'FileName,EmoClass'"]),
    ("fields", ["rows without 2 fields (1):", "line 3: 3 field(s), expected 2 (FileName,EmoClass)"]),
])
def test_each_task1_problem_is_named_with_its_line(data, tmp_path, case, expected):
    lines = good_class_lines()
    if case == "other":
        lines[2] = f"{ids()[1]},O"
    elif case == "x":
        lines[3] = f"{ids()[2]},X"
    elif case == "lower":
        lines[1] = f"{ids()[0]},a"
    elif case == "space":
        lines[1] = f"{ids()[0]}, A"
    elif case == "word":
        lines[5] = f"{ids()[4]},Neutral"
    elif case == "empty":
        lines[5] = f"{ids()[4]},"
    elif case == "missing":
        lines = lines[:-1]
    elif case == "extra":
        lines.append("MSP-PODCAST_1000_0001.wav,N")
    elif case == "duplicate":
        lines.append(lines[2])
    elif case == "header":
        lines[0] = "FileName,Emotion"
    elif case == "fields":
        lines[2] = f"{ids()[1]},S,0.9"
    code, out = check_classes(write(tmp_path, lines), data)
    assert code == 1, out
    for text in expected:
        assert text in out
    assert out.endswith("REJECTED: 1 problem(s)")


def test_a_prediction_file_with_probabilities_is_not_a_submission(data, tmp_path):
    from ser_cache.runs.prediction_file import write_class_predictions

    probs = [[0.0] * 7 + [1.0]] * 5
    path = write_class_predictions(tmp_path / "p.csv", ids(), ["N"] * 5, probs)
    result = check_submission(path, data=data, split="Test3", task="categorical")
    assert {p.kind for p in result.problems} == {"header", "fields"}
    assert "probability columns are not part of the submission" in str(result.problems[0])
    assert len(result.problems) == 6  # the header and each of the 5 rows of 10 fields
    plain = write_class_predictions(tmp_path / "plain.csv", ids(), ["N"] * 5)
    assert check_submission(plain, data=data, split="Test3", task="categorical").ok


def test_every_task1_problem_is_listed_and_long_lists_are_capped(data, tmp_path):
    lines = [CLASS_HEADER.lower()] + [f"{u},O" for u in ids(4)] + [f"x{k}.wav,N" for k in range(25)]
    code, out = check_classes(write(tmp_path, lines), data)
    assert code == 1
    # 1 header + 4 classes O + 25 unknown + 1 missing
    assert out.endswith("REJECTED: 31 problem(s)")
    assert "classes that are not one of the 8 codes (4):" in out
    assert f"… and {25 - SHOWN_PER_KIND} more" in out and "'x19.wav'" in out and "'x20.wav'" not in out


def test_a_task1_empty_file_and_an_unknown_task(data, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    code, out = check_classes(empty, data)
    assert code == 1 and "the file is empty; expected the header FileName,EmoClass" in out
    assert "MSP-PODCAST_test3_0001.wav has no row" in out
    code, out = check(write(tmp_path, good_class_lines()), data, "--task", "both")
    assert code == 2 and "--task" in out
    with pytest.raises(Exception, match="--task both: expected attributes"):
        check_submission(tmp_path / "sub.csv", data=data, task="both")
