"""ensemble: weighted averages of prediction files, id checks, scoring against a split."""

from __future__ import annotations

import numpy as np
import pytest

from ser_cache.runs import prediction_file
from ser_cache.runs.ensemble import EnsembleError, ensemble
from ser_cache.system.metrics import ccc_table

from synthetic import make_corpus, read_csv


def write(path, ids, avd):
    return prediction_file.write_predictions(path, ids, np.asarray(avd, dtype=float))


@pytest.fixture
def two(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"u{i}.wav" for i in range(20)]
    a, b = rng.uniform(1, 7, (20, 3)), rng.uniform(1, 7, (20, 3))
    # The second file lists the same ids in another order.
    order = rng.permutation(20)
    return ids, a, b, write(tmp_path / "a.csv", ids, a), write(tmp_path / "b.csv", [ids[i] for i in order], b[order])


def test_equal_and_weighted_averages(tmp_path, two):
    ids, a, b, fa, fb = two
    result = ensemble([fa, fb], out=tmp_path / "mean.csv")
    got_ids, got = prediction_file.read_predictions(result.out)
    assert got_ids == ids and result.rows == 20 and result.weights == [0.5, 0.5]
    np.testing.assert_allclose(got, (a + b) / 2, atol=1e-6)
    weighted = ensemble([fa, fb], out=tmp_path / "w.csv", weights=[3, 1])
    np.testing.assert_allclose(prediction_file.read_predictions(weighted.out)[1], 0.75 * a + 0.25 * b, atol=1e-6)
    assert list(read_csv(weighted.out)[0]) == ["FileName", "EmoAct", "EmoVal", "EmoDom"]


def test_files_that_cover_other_ids_are_refused_naming_file_and_ids(tmp_path, two):
    ids, a, b, fa, _ = two
    fc = write(tmp_path / "c.csv", ids[:-2] + ["stranger.wav"], np.vstack([a[:-2], a[:1]]))
    with pytest.raises(EnsembleError) as info:
        ensemble([fa, fc], out=tmp_path / "x.csv")
    message = str(info.value)
    assert str(fc) in message and ids[-1] in message and ids[-2] in message and "stranger.wav" in message
    assert not (tmp_path / "x.csv").exists()


def test_bad_weights_and_too_few_files(tmp_path, two):
    _, _, _, fa, fb = two
    with pytest.raises(EnsembleError, match="2 prediction file"):
        ensemble([fa, fb], out=tmp_path / "x.csv", weights=[1, 2, 3])
    with pytest.raises(EnsembleError, match="non-negative"):
        ensemble([fa, fb], out=tmp_path / "x.csv", weights=[1, -2])
    with pytest.raises(EnsembleError, match="at least 2"):
        ensemble([fa], out=tmp_path / "x.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("FileName,EmoAct\nu0.wav,3\n")
    with pytest.raises(EnsembleError, match="missing column"):
        ensemble([fa, bad], out=tmp_path / "x.csv")


def test_scoring_against_a_split(tmp_path):
    manifest, ids, _ = make_corpus(tmp_path / "corpus", 100)
    rows = [r for r in read_csv(manifest) if r["split"] == "Development"]
    truth = np.array([[float(r[k]) for k in ("arousal", "valence", "dominance")] for r in rows])
    dev_ids = [r["id"] for r in rows]
    rng = np.random.default_rng(1)
    fa = write(tmp_path / "a.csv", dev_ids, truth + rng.normal(0, 0.5, truth.shape))
    fb = write(tmp_path / "b.csv", dev_ids, truth + rng.normal(0, 0.5, truth.shape))
    result = ensemble([fa, fb], out=tmp_path / "e.csv", data=manifest, split="Development")
    expected = ccc_table(prediction_file.read_predictions(result.out)[1], truth)
    for key, value in expected.items():
        assert result.scores["ccc"][key] == pytest.approx(value, abs=1e-5)
    single = ccc_table(prediction_file.read_predictions(fa)[1], truth)["mean"]
    assert result.scores["ccc"]["mean"] > single  # averaging independent errors helps
    assert result.scores["balanced_ccc"] is not None

    with pytest.raises(EnsembleError, match="lack .* labelled utterance"):
        ensemble([fa, fb], out=tmp_path / "e2.csv", data=manifest, split="Test1")
    with pytest.raises(EnsembleError, match="go together"):
        ensemble([fa, fb], out=tmp_path / "e3.csv", data=manifest)


def test_ensemble_writes_four_columns_and_averages_gender_only_when_asked(tmp_path):
    import csv as _csv

    from ser_cache.runs import prediction_file
    from ser_cache.runs.ensemble import EnsembleError, ensemble

    ids = ["a.wav", "b.wav"]
    avd = np.array([[2.0, 3.0, 4.0], [5.0, 6.0, 1.5]])
    a = prediction_file.write_predictions(tmp_path / "a.csv", ids, avd, gender_labels=["Female", "Male"],
                                gender_probs=np.array([[0.9, 0.1], [0.2, 0.8]]))
    b = prediction_file.write_predictions(tmp_path / "b.csv", ids, avd + 1, gender_labels=["Female", "Male"],
                                gender_probs=np.array([[0.5, 0.5], [0.6, 0.4]]))
    c = prediction_file.write_predictions(tmp_path / "c.csv", ids, avd)  # a member without a gender head
    plain = ensemble([a, b], out=tmp_path / "plain.csv")
    assert next(_csv.reader(open(plain.out))) == ["FileName", "EmoAct", "EmoVal", "EmoDom"]
    both = ensemble([a, b, c], out=tmp_path / "g.csv", weights=[1, 1, 2], with_gender=True)
    rows = list(_csv.DictReader(open(both.out)))
    assert [r["Gender"] for r in rows] == ["Female", "Male"]  # (0.7, 0.3) and (0.4, 0.6)
    assert float(rows[1]["GenderProb_Male"]) == pytest.approx(0.6)
    _, mean = prediction_file.read_predictions(both.out)
    np.testing.assert_allclose(mean, (avd + avd + 1 + 2 * avd) / 4)
    with pytest.raises(EnsembleError, match="no member file has gender columns"):
        ensemble([c, c], out=tmp_path / "x.csv", with_gender=True)


# Task 1: the members' class probabilities averaged, the winning code written.
def class_member(path, ids, probs, classes=None):
    from ser_cache.system.tasks import CLASSES_8

    classes = classes or CLASSES_8
    probs = np.asarray(probs, dtype=float)
    return prediction_file.write_class_predictions(path, ids, [classes[k] for k in probs.argmax(1)], probs,
                                                   classes=classes)


def distributions(rng, n, c=8):
    x = rng.random((n, c)) ** 3
    return x / x.sum(1, keepdims=True)


def test_a_task1_ensemble_is_the_mean_of_the_probabilities_and_its_argmax(tmp_path):
    from ser_cache.system.tasks import CLASSES_8

    rng = np.random.default_rng(0)
    ids = [f"u{i}.wav" for i in range(30)]
    a, b = distributions(rng, 30), distributions(rng, 30)
    order = rng.permutation(30)  # the second member lists the ids in another order
    fa = class_member(tmp_path / "a.csv", ids, a)
    fb = class_member(tmp_path / "b.csv", [ids[i] for i in order], b[order])
    result = ensemble([fa, fb], out=tmp_path / "e.csv", task="categorical")
    assert result.rows == 30 and result.weights == [0.5, 0.5] and result.scores is None
    got_ids, codes, probs, classes = prediction_file.read_class_predictions(result.out)
    assert got_ids == ids and probs is None and classes == CLASSES_8  # the submission format unless asked
    mean = (a + b) / 2
    assert codes == [CLASSES_8[k] for k in mean.argmax(1)]
    assert codes != [CLASSES_8[k] for k in a.argmax(1)]  # the members disagree somewhere: the mean decides
    weighted = ensemble([fa, fb], out=tmp_path / "w.csv", task="categorical", weights=[3, 1], with_probabilities=True)
    _, codes, probs, _ = prediction_file.read_class_predictions(weighted.out)
    np.testing.assert_allclose(probs, 0.75 * a + 0.25 * b, atol=1e-6)
    assert codes == [CLASSES_8[k] for k in (0.75 * a + 0.25 * b).argmax(1)]


def test_a_tie_goes_to_the_first_class_in_the_run_order(tmp_path):
    ids = ["a.wav"]
    p = np.zeros((1, 8))
    fa = class_member(tmp_path / "a.csv", ids, p + np.eye(8)[[7]])  # N
    fb = class_member(tmp_path / "b.csv", ids, p + np.eye(8)[[1]])  # S: 0.5 each for S and N
    result = ensemble([fa, fb], out=tmp_path / "e.csv", task="categorical")
    assert prediction_file.read_class_predictions(result.out)[1] == ["S"]


def test_task1_members_must_have_probabilities_for_the_same_classes(tmp_path):
    from ser_cache.system.tasks import class_codes

    rng = np.random.default_rng(1)
    ids = ["a.wav", "b.wav"]
    fa = class_member(tmp_path / "a.csv", ids, distributions(rng, 2))
    bare = prediction_file.write_class_predictions(tmp_path / "bare.csv", ids, ["A", "N"])
    with pytest.raises(EnsembleError, match=f"^{bare} has no probability columns .*predict this member with "
                                            "--with-probabilities"):
        ensemble([fa, bare], out=tmp_path / "e.csv", task="categorical")
    nine = class_member(tmp_path / "nine.csv", ids, distributions(rng, 2, 9), class_codes(9))
    with pytest.raises(EnsembleError, match=f"^{nine} has probabilities for the classes A,S,H,U,F,D,C,N,O, {fa} for "
                                            "A,S,H,U,F,D,C,N"):
        ensemble([fa, nine], out=tmp_path / "e.csv", task="categorical")
    fewer = class_member(tmp_path / "fewer.csv", ids[:1], distributions(rng, 1))
    with pytest.raises(EnsembleError, match=f"{fewer} does not cover the same utterances: lacks 1 id"):
        ensemble([fa, fewer], out=tmp_path / "e.csv", task="categorical")
    avd = write(tmp_path / "avd.csv", ids, [[4, 4, 4], [3, 3, 3]])
    with pytest.raises(EnsembleError, match=r"avd.csv, line 1: header .*\(an arousal/valence/dominance file: "
                                            "ensemble it without --task categorical\\)"):
        ensemble([fa, avd], out=tmp_path / "e.csv", task="categorical")
    with pytest.raises(EnsembleError, match=r"missing column.*\(a Task 1 class prediction file: ensemble it with "
                                            "--task categorical\\)"):
        ensemble([fa, avd], out=tmp_path / "e.csv")
    assert not (tmp_path / "e.csv").exists()


def test_task1_options_that_do_not_apply_are_refused(tmp_path):
    rng = np.random.default_rng(2)
    ids = ["a.wav", "b.wav"]
    fa = class_member(tmp_path / "a.csv", ids, distributions(rng, 2))
    fb = class_member(tmp_path / "b.csv", ids, distributions(rng, 2))
    with pytest.raises(EnsembleError, match="--with-gender .* not with --task categorical"):
        ensemble([fa, fb], out=tmp_path / "e.csv", task="categorical", with_gender=True)
    with pytest.raises(EnsembleError, match="--plots .* not with --task categorical"):
        ensemble([fa, fb], out=tmp_path / "e.csv", task="categorical", plots=tmp_path / "figs", data=tmp_path,
                 split="Development")
    with pytest.raises(EnsembleError, match="--with-probabilities .* give --task categorical"):
        ensemble([fa, fb], out=tmp_path / "e.csv", with_probabilities=True)
    with pytest.raises(EnsembleError, match="--task both: expected attributes"):
        ensemble([fa, fb], out=tmp_path / "e.csv", task="both")


def test_a_task1_ensemble_scored_as_scikit_learn_scores_it(tmp_path):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    from ser_cache.system.tasks import CLASSES_8

    manifest, _, _ = make_corpus(tmp_path / "corpus", 200)
    rows = [r for r in read_csv(manifest) if r["split"] == "Development"]
    dev_ids = [r["id"] for r in rows]
    truth = [r["emotion"] for r in rows]
    assert {"O", "X"} & set(truth)  # rows without a Task 1 class, left out of the scores
    rng = np.random.default_rng(3)
    onehot = np.array([np.eye(8)[CLASSES_8.index(t)] if t in CLASSES_8 else np.full(8, 1 / 8) for t in truth])
    fa = class_member(tmp_path / "a.csv", dev_ids, 0.1 * onehot + 0.9 * distributions(rng, len(rows)))
    fb = class_member(tmp_path / "b.csv", dev_ids, 0.1 * onehot + 0.9 * distributions(rng, len(rows)))
    result = ensemble([fa, fb], out=tmp_path / "e.csv", task="categorical", data=manifest, split="Development")
    _, codes, _, _ = prediction_file.read_class_predictions(result.out)
    keep = [i for i, t in enumerate(truth) if t in CLASSES_8]
    y, p = [truth[i] for i in keep], [codes[i] for i in keep]
    assert result.scores["n"] == len(keep) < len(rows)
    assert result.scores["macro_f1"] == pytest.approx(f1_score(y, p, labels=list(CLASSES_8), average="macro",
                                                               zero_division=0))
    assert result.scores["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert result.scores["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    assert 0.2 < result.scores["accuracy"] < 0.95  # better than chance, not perfect: a real table
    member_codes = prediction_file.read_class_predictions(fa)[1]
    assert result.members[0]["accuracy"] == pytest.approx(accuracy_score(y, [member_codes[i] for i in keep]))
    assert result.scores["accuracy"] >= min(m["accuracy"] for m in result.members)
    with pytest.raises(EnsembleError, match="lack .* labelled utterance"):
        ensemble([fa, fb], out=tmp_path / "e2.csv", task="categorical", data=manifest, split="Test1")


def test_ensemble_task_categorical_from_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from ser_cache.cli.app import app

    manifest, _, _ = make_corpus(tmp_path / "corpus", 100)
    dev_ids = [r["id"] for r in read_csv(manifest) if r["split"] == "Development"]
    rng = np.random.default_rng(4)
    fa = class_member(tmp_path / "sys_a.csv", dev_ids, distributions(rng, len(dev_ids)))
    fb = class_member(tmp_path / "sys_b.csv", dev_ids, distributions(rng, len(dev_ids)))
    runner = CliRunner()
    r = runner.invoke(app, ["ensemble", str(fa), str(fb), "--out", str(tmp_path / "e.csv"), "--task", "categorical",
                            "--with-probabilities", "--data", str(manifest), "--split", "Development"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "Task 1" in text and "macro-F1" in text and "balanced accuracy" in text and "sys_a" in text
    header = next(iter(open(tmp_path / "e.csv"))).strip()
    assert header == "FileName,EmoClass," + ",".join(f"prob_{c}" for c in "ASHUFDCN")
    r = runner.invoke(app, ["ensemble", str(fa), str(fb), "--out", str(tmp_path / "f.csv"), "--task", "categorical",
                            "--label-scale", "0 1"])
    assert r.exit_code == 2 and "--label-scale" in r.output and not (tmp_path / "f.csv").exists()
