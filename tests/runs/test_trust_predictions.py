"""Nothing silently wrong in predictions, ensembles, sweeps and training (issue 17, items 6, 10, 11 and
their tracebacks and misleading messages): every case builds its own bad input.

- a sweep member trained on a store since rebuilt with other settings is not reused; a member
  folder without config.json is named with what it holds;
- a prediction that is not finite, or leaves the run's label range, is refused (predict, evaluate,
  Predictor); an ensemble member's value off the scale, or not a plain number, is refused; the
  submission checker reads numbers as a CSV reader does;
- a run on an x-vector store predicts new audio;
- training that diverges is one line, and a sweep keeps (and reports) the members that did not;
- one-line refusals instead of tracebacks or misleading messages.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.features.store import FeatureStore
from ser_cache.runs import layout, prediction_file, rundir
from ser_cache.runs.ensemble import EnsembleError, ensemble
from ser_cache.runs.predict import PredictError, evaluate, predict
from ser_cache.system.errors import TrainError
from ser_cache.system.rows import load_rows
from ser_cache.train.options import TrainHeadsConfig
from ser_cache.train.sweep import SweepConfig, parse_variant, sweep

from factories import msp_corpus
from synthetic import make_corpus, make_frame_corpus, make_frame_store, make_store, train

runner = CliRunner()
OPTIONS = dict(epochs=2, lr=3e-3, batch_size=32, undersample=False, progress=False, device="cpu", threads=1,
               speaker_weight=0.0)


def invoke(*args, width: int = 200):
    return runner.invoke(app, [str(a) for a in args], terminal_width=width)


def one_line_error(output: str) -> str:
    """The error line of a refused command; there must be exactly one, and no traceback."""
    assert "Traceback" not in output and "internal error" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    manifest, ids, feats = make_corpus(root / "corpus", 120)
    stores = [make_store(root / "f" / "audio.zarr", ids, feats["audio"]),
              make_store(root / "f" / "text.zarr", ids, feats["text"], kind="text", modality="text")]
    return manifest, ids, feats, stores


@pytest.fixture(scope="module")
def run(synthetic, tmp_path_factory):
    manifest, _, _, stores = synthetic
    result, _ = train(tmp_path_factory.mktemp("run"), manifest, stores, epochs=2)
    return result.run_dir


def _edit_weights(run_dir: Path, dest: Path, change) -> Path:
    """A copy of `run_dir` whose model.safetensors went through `change(tensors)`."""
    shutil.copytree(run_dir, dest)
    tensors = load_file(str(dest / layout.WEIGHTS))
    change(tensors)
    save_file(tensors, str(dest / layout.WEIGHTS))
    return dest


def _nan_in(name: str):
    def change(tensors: dict) -> None:
        tensors[name][0, 0] = float("nan")
    return change


_nan_in_first_layer = _nan_in("heads.regressors.arousal.mlp.0.weight")


# --------------------------------------------------------------------------- sweep: stale members


def _sweep_config(manifest, stores, out, **kw) -> SweepConfig:
    base = TrainHeadsConfig(features=tuple(stores), data=manifest, out=out, **{**OPTIONS, "epochs": 1, **kw})
    return SweepConfig(base, seeds=1, resamples=10)


def test_a_sweep_does_not_reuse_members_trained_on_a_store_rebuilt_with_other_settings(tmp_path):
    manifest, ids, feats = make_corpus(tmp_path / "corpus", 120)
    audio = make_store(tmp_path / "f" / "audio.zarr", ids, feats["audio"])
    cfg = _sweep_config(manifest, [audio], tmp_path / "sweep")
    assert sweep(cfg).trained == 1
    # The store rebuilt in place (extract --overwrite) with another revision of the encoder.
    shutil.rmtree(audio)
    settings = {"kind": "whisper", "model_id": "fake/audio", "revision": "r2", "pooling": "mean"}
    make_store(audio, ids, feats["audio"][:, ::-1].copy(), settings=settings)
    with pytest.raises(TrainError, match=r"base/seed-0: trained on store .*audio.zarr with fingerprint \w+, but the "
                                         r"store now has \w+: it was rebuilt since \(revision: trained on 'r1', "
                                         r"now 'r2'\).*pass --overwrite"):
        sweep(cfg)
    redone = sweep(_sweep_config(manifest, [audio], tmp_path / "sweep", overwrite=True))
    assert (redone.trained, redone.reused) == (1, 0)
    recorded = rundir.read_config(tmp_path / "sweep" / "base" / "seed-0")["inputs"][0]["fingerprint"]
    assert recorded == FeatureStore.open(audio).fingerprint
    assert (sweep(cfg).trained, sweep(cfg).reused) == (0, 1)  # now the same store again: reused


def test_a_sweep_member_folder_without_config_json_says_what_it_holds(synthetic, tmp_path):
    manifest, _, _, stores = synthetic
    member = tmp_path / "sweep" / "base" / "seed-0"
    member.mkdir(parents=True)
    (member / layout.WEIGHTS).write_bytes(b"not much")
    (member / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match=r"base/seed-0: this sweep's folder for a member, but not a finished run: "
                                         r"it has no config.json \(it holds model.safetensors, notes.txt\); move the "
                                         r"folder away \(or delete it\)"):
        sweep(_sweep_config(manifest, stores, tmp_path / "sweep"))
    assert not (tmp_path / "sweep" / "sweep.json").exists()  # refused before any training
    assert (member / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- -V refusals


@pytest.mark.parametrize(("text", "message"), [
    ("a: inputs=", "--variant a: inputs= has no value"),
    ("a: lr=", "--variant a: lr= has no value"),
    ("a: lr=3e-3 lr=5e-1", r"--variant a: lr is given twice \(lr=3e-3 and lr=5e-1\); give each option once"),
    ("a: ox=drop, --ox=keep", r"--variant a: ox is given twice \(ox=drop and --ox=keep\)"),
])
def test_a_variant_with_an_empty_or_repeated_option_is_refused(text, message):
    with pytest.raises(TrainError, match=message):
        parse_variant(text)


# --------------------------------------------------------------------------- divergence


def test_train_heads_that_diverges_is_one_line_naming_the_epoch(synthetic, tmp_path):
    manifest, _, _, stores = synthetic
    r = invoke("train-heads", "-f", stores[0], "-f", stores[1], "-d", manifest, "-o", tmp_path / "run", "--lr", 1e30,
               "--epochs", 3, "--device", "cpu", "--threads", 1, "--no-progress", "--speaker-weight", 0)
    assert r.exit_code == 2, r.output
    line = one_line_error(r.output)
    assert "training diverged:" in line and "in epoch 1 of 3 (--lr 1e+30)" in line and "lower --lr" in line
    assert not (tmp_path / "run").exists()


def test_a_sweep_keeps_the_members_that_did_not_diverge_and_reports_the_others(synthetic, tmp_path):
    manifest, _, _, stores = synthetic
    args = ["sweep", "-f", stores[0], "-f", stores[1], "-d", manifest, "--seeds", 2, "--epochs", 2, "--lr", 3e-3,
            "--device", "cpu", "--threads", 1, "--no-progress", "--speaker-weight", 0, "--resamples", 10]
    r = invoke(*args, "-o", tmp_path / "sweep", "-V", "huge: lr=1e30", "-V", "drop: dropout=0.2", width=100)
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    huge = summary["variants"]["huge"]
    assert huge["members"] == [] and [d["seed"] for d in huge["diverged"]] == [0, 1]
    assert all(d["epoch"] == 1 and d["reason"].startswith("training diverged") for d in huge["diverged"])
    assert summary["comparisons"]["huge"] is None and summary["variants"]["base"]["diverged"] == []
    # No run of a diverged member: only the record the summary reads (and a shard's completion counts).
    assert sorted(p.name for p in (tmp_path / "sweep" / "huge").iterdir()) == ["seed-0.diverged.json",
                                                                                "seed-1.diverged.json"]
    assert "huge*" in r.output and "* huge: seed(s) 0, 1 of 2 diverged" in " ".join(r.output.split())
    assert "sweep member huge/seed-0: training diverged" in " ".join(r.output.split())
    # The others trained as if the diverged members had not been in their stack.
    alone = invoke(*args, "-o", tmp_path / "alone")
    assert alone.exit_code == 0, alone.output
    for seed in (0, 1):
        mine = prediction_file.read_predictions(tmp_path / "sweep" / "base" / f"seed-{seed}" / layout.DEV_PREDICTIONS)
        theirs = prediction_file.read_predictions(tmp_path / "alone" / "base" / f"seed-{seed}" / layout.DEV_PREDICTIONS)
        assert mine[0] == theirs[0]
        np.testing.assert_allclose(mine[1], theirs[1], atol=1e-6)


# --------------------------------------------------------------------------- predictions checked


def test_a_run_whose_weights_hold_a_nan_predicts_nothing(synthetic, run, tmp_path):
    manifest, *_ = synthetic
    damaged = _edit_weights(run, tmp_path / "nan-run", _nan_in_first_layer)
    with pytest.raises(PredictError, match=r"run .*nan-run: its EmoAct prediction for utt_\d+\.wav \(row 1\) is nan, "
                                           r"not a finite number; its weights hold non-finite values \(heads\..*\)"):
        predict(damaged, data=manifest, splits=["Development"], out=tmp_path / "p.csv", device="cpu")
    assert not (tmp_path / "p.csv").exists()
    with pytest.raises(PredictError, match="is nan, not a finite number"):
        evaluate(damaged, manifest, "Development", device="cpu")
    assert not list(damaged.glob("eval_*.json"))
    r = invoke("predict", damaged, "-d", manifest, "-s", "Development", "-o", tmp_path / "p.csv", "--device", "cpu")
    assert r.exit_code == 2 and "is nan, not a finite number" in one_line_error(r.output)
    # A NaN in the gender head: its probabilities are predictions too.
    gender = _edit_weights(run, tmp_path / "nan-gender", _nan_in("heads.gender.0.weight"))
    with pytest.raises(PredictError, match=r"its GenderProb_Female prediction for utt_\d+\.wav \(row 1\) is nan, "
                                           r"not a finite number; its weights hold non-finite values "
                                           r"\(heads.gender.0.weight\)"):
        predict(gender, data=manifest, splits=["Development"], out=tmp_path / "g.csv", device="cpu", with_gender=True)
    assert not (tmp_path / "g.csv").exists()


def test_predictions_outside_the_runs_label_range_are_refused(synthetic, run, tmp_path):
    manifest, *_ = synthetic

    def widen(tensors):  # the heads' upper bound moved far past the run's recorded label range
        for name in [k for k in tensors if k.endswith(".hi")]:
            tensors[name] = torch.tensor(99.0)

    edited = _edit_weights(run, tmp_path / "wide-run", widen)
    hi = rundir.read_config(edited)["labels"]["max"][0]
    with pytest.raises(PredictError, match=rf"its EmoAct prediction for utt_\d+\.wav \(row \d+\) is [\d.]+, outside "
                                           rf"the label range \[[\d.]+, {hi:g}\] of the run's config.json"):
        predict(edited, data=manifest, splits=["Development"], out=tmp_path / "p.csv", device="cpu")
    assert not (tmp_path / "p.csv").exists()


def _members(tmp_path: Path, n: int = 4) -> tuple[list[str], Path, Path]:
    ids = [f"u{i}.wav" for i in range(n)]
    rng = np.random.default_rng(0)
    a = prediction_file.write_predictions(tmp_path / "a.csv", ids, rng.uniform(2, 6, (n, 3)))
    b = prediction_file.write_predictions(tmp_path / "b.csv", ids, rng.uniform(2, 6, (n, 3)))
    return ids, a, b


def _set_cell(path: Path, row: int, column: str, value: str, *, encoding: str = "utf-8") -> Path:
    rows = list(csv.DictReader(open(path, newline="", encoding="utf-8-sig")))
    rows[row][column] = value
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.parametrize(("value", "why"), [
    ("99", r"EmoVal is 99, outside the label range \[1, 7\]"),
    ("nan", "EmoVal is nan, not a finite number"),
    ("4_5", r"EmoVal is '4_5', expected a number in plain decimal notation"),
    ("\u0664", r"EmoVal is '\u0664', expected a number in plain decimal notation"),  # Arabic-Indic four
])
def test_an_ensemble_member_value_off_the_scale_or_not_a_plain_number_is_refused(tmp_path, value, why):
    ids, a, b = _members(tmp_path)
    _set_cell(b, 1, "EmoVal", value)
    with pytest.raises(EnsembleError, match=rf"b.csv, line 3 \(u1.wav\): {why}"):
        ensemble([a, b], out=tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_an_ensemble_member_saved_with_a_bom_is_read(tmp_path):
    ids, a, b = _members(tmp_path)
    expected = (prediction_file.read_predictions(a)[1] + prediction_file.read_predictions(b)[1]) / 2
    # as Excel saves it
    _set_cell(b, 0, "EmoAct", f"{prediction_file.read_predictions(b)[1][0, 0]:.6f}", encoding="utf-8-sig")
    assert b.read_bytes().startswith(b"\xef\xbb\xbf")
    result = ensemble([a, b], out=tmp_path / "out.csv")
    got_ids, got = prediction_file.read_predictions(result.out)
    assert got_ids == ids
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_ensemble_label_scale_option_for_a_corpus_on_another_scale(tmp_path):
    ids = ["u0.wav", "u1.wav", "u2.wav"]
    a = prediction_file.write_predictions(tmp_path / "a.csv", ids, np.full((3, 3), 0.25))
    b = prediction_file.write_predictions(tmp_path / "b.csv", ids, np.full((3, 3), 0.75))
    r = invoke("ensemble", a, b, "-o", tmp_path / "out.csv")
    assert r.exit_code == 2
    line = one_line_error(r.output)
    assert "outside the label range [1, 7] (a corpus on another scale: --label-scale LOW HIGH)" in line
    r = invoke("ensemble", a, b, "-o", tmp_path / "out.csv", "--label-scale", "0 1")
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(prediction_file.read_predictions(tmp_path / "out.csv")[1], 0.5)


# --------------------------------------------------------------------------- check-submission


SUBMISSION_IDS = [f"MSP-PODCAST_test3_{k:04d}.wav" for k in range(1, 4)]


@pytest.fixture
def test3(tmp_path) -> Path:
    return msp_corpus(tmp_path / "c", n=4, unlabeled=3)


def _submission(path: Path, cells: list[str]) -> Path:
    lines = ["FileName,EmoAct,EmoVal,EmoDom"] + [f"{u},{c},4.0,4.0" for u, c in zip(SUBMISSION_IDS, cells)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("value", ["4_5", "\u0664", "\u0664.\u0665", "\uff14", "4.5\u00a0"],
                         ids=["underscore", "arabic-indic", "arabic-indic-decimal", "full-width", "nbsp"])
def test_check_submission_reads_numbers_as_a_csv_reader_does(test3, tmp_path, value):
    good = _submission(tmp_path / "good.csv", [" 4.5", "+1e0", ".5e1"])
    r = invoke("check-submission", good, "--data", test3)
    assert r.exit_code == 0, r.output
    bad = _submission(tmp_path / "bad.csv", ["4.5", value, "4.5"])
    r = invoke("check-submission", bad, "--data", test3)
    out = " ".join(r.output.split())
    assert r.exit_code == 1, out
    assert f"line 3: EmoAct is {value!r}, expected a number in plain decimal notation" in out
    assert out.endswith("REJECTED: 1 problem(s)")


def test_check_submission_on_a_folder_says_it_is_a_folder(test3, tmp_path):
    (tmp_path / "submission").mkdir()
    r = invoke("check-submission", tmp_path / "submission", "--data", test3)
    assert r.exit_code == 2
    assert "submission: a folder, not a file" in one_line_error(r.output)


def test_check_submission_with_an_unterminated_quote_is_one_line(test3, tmp_path):
    path = tmp_path / "sub.csv"
    path.write_text(f"FileName,EmoAct,EmoVal,EmoDom\n{SUBMISSION_IDS[0]},4,4,4\n"
                    f'{SUBMISSION_IDS[1]},"4,4,4\n' + "x" * 200_000 + "\n", encoding="utf-8")
    r = invoke("check-submission", path, "--data", test3)
    assert r.exit_code == 2, r.output
    line = one_line_error(r.output)
    assert "sub.csv, line 3: not readable as CSV (field larger than field limit" in line
    assert "never closed" in line


# --------------------------------------------------------------------------- x-vector runs


@pytest.fixture(scope="module")
def xvector_run(models, tmp_path_factory):
    from ser_cache.features.extract import ExtractConfig, extract

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("xvector")
    corpus = msp_corpus(root / "corpus")
    store = extract(ExtractConfig(model=str(models["xvector"]), data=corpus, out=root / "f", name="xvector",
                                  splits=("Train", "Development"), device="cpu", workers=0, progress=False)).store
    result, _ = train(root, corpus, [store], epochs=1, lr=1e-3, batch_size=4, select="ccc", speaker_weight=0.0)
    yield result.run_dir, corpus
    torch.set_num_threads(before)


def test_a_run_on_an_xvector_store_predicts_new_audio(xvector_run, tmp_path):
    import soundfile as sf

    from ser_cache.api import Predictor
    from ser_cache.data.corpus import load_corpus

    run_dir, corpus = xvector_run
    assert rundir.read_config(run_dir)["inputs"][0]["settings"]["pooling"] == "xvector"
    dev = load_corpus(corpus, ["Development"])
    cached = predict(run_dir, data=corpus, splits=["Development"], out=tmp_path / "cached.csv", device="cpu")
    assert all(s.startswith("store ") for s in cached.sources.values())
    r = invoke("predict", run_dir, *[u.path for u in dev], "-o", tmp_path / "bare.csv", "--device", "cpu")
    assert r.exit_code == 0, r.output
    ids, bare = prediction_file.read_predictions(tmp_path / "bare.csv")
    assert ids == [u.id for u in dev]
    # The encoder run here gives what the store holds (float16 rounding apart).
    np.testing.assert_allclose(bare, prediction_file.read_predictions(cached.out)[1], atol=2e-3)
    predictor = Predictor.from_run(run_dir)
    got = predictor.predict([str(dev[0].path), sf.read(str(dev[1].path), dtype="float32")[0]])
    np.testing.assert_allclose(np.stack([got["arousal"], got["valence"], got["dominance"]], 1), bare[:2], atol=1e-5)


def test_predictor_refuses_a_nan_prediction(xvector_run, tmp_path):
    from ser_cache.api import Predictor
    from ser_cache.data.corpus import load_corpus

    run_dir, corpus = xvector_run
    damaged = _edit_weights(run_dir, tmp_path / "nan-xvector", _nan_in_first_layer)
    clip = load_corpus(corpus, ["Development"])[0].path
    with pytest.raises(PredictError, match=r"nan-xvector: its EmoAct prediction for 0:.* \(row 1\) is nan, not a "
                                           r"finite number; its weights hold non-finite values"):
        Predictor.from_run(damaged).predict(str(clip))


# --------------------------------------------------------------------------- stores changed or misused


def test_a_frame_store_rebuilt_while_training_streams_it_is_named(tmp_path):
    manifest, ids, frames, _ = make_frame_corpus(tmp_path / "corpus", 60)
    path = make_frame_store(tmp_path / "f" / "frames.zarr", ids, frames, chunk_rows=10)
    data = load_rows(manifest, "Train", "Development", [path], speaker_weight=0.0, frames=True, memory_budget_gb=1e-6)
    assert data.streamed
    rows = np.arange(data.ids.size)
    blocks = data.in_blocks(rows)
    next(blocks)  # the first block is read from the store as it was
    shutil.rmtree(path)  # extract --overwrite removes the store, then builds another in its place
    with pytest.raises(TrainError, match=r"frames.zarr: the frame store changed while training was reading it "
                                         r"\(rebuilt by `extract --overwrite`, or replaced\): training stopped"):
        next(blocks)
    make_frame_store(path, ids, frames, chunk_rows=10)  # rebuilt with the very same settings, another time
    FeatureStore.open(path, mode="r+").group.attrs["created"] = "2030-01-01T00:00:00+0000"
    blocks = data.in_blocks(rows)
    with pytest.raises(TrainError, match=r"changed while training was reading it .*\(created: None when training "
                                         r"started, now '2030-01-01"):
        next(blocks)


def test_layer_on_a_pooled_store_is_refused(tmp_path):
    from ser_cache.runs.plots import PlotError, speaker_tsne

    from synthetic import speaker_corpus, speaker_store

    manifest, ids, labels = speaker_corpus(tmp_path / "corpus")
    store = speaker_store(tmp_path / "pooled.zarr", ids, labels, separated=True, shape=(32,))
    with pytest.raises(PlotError, match=r"--layer 2: store .*pooled.zarr holds one vector of \(32,\) per utterance, "
                                        r"no layers; leave --layer out"):
        speaker_tsne(store, manifest, speakers=4, per_speaker=5, layer=2, out=tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()
