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
