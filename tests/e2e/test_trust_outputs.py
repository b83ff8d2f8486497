"""Nothing lost: no command writes over one of its inputs or inside a run, store or corpus it reads,
none replaces an existing file without --overwrite (outputs.py), and an --overwrite of a run killed
between its two renames is undone by the next command (staging.recover_staging)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.runs import layout, staging

from synthetic import make_corpus, make_store, train

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(r) -> str:
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    return lines[0]


def dead_pid() -> int:
    """The id of a process that has ended (what a kill -9 leaves in a staging folder's name)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- a run that predicts audio


@pytest.fixture(scope="module")
def whisper_run(tmp_path_factory, models):
    """A run on a tiny Whisper store over every labelled utterance of a small MSP-Podcast corpus: it
    predicts corpus splits from the store and bare audio files with the encoder."""
    import torch

    from ser_cache.features.extract import ExtractConfig, extract

    from factories import msp_corpus

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("outputs")
    corpus = msp_corpus(root / "corpus")
    store = extract(ExtractConfig(model=str(models["whisper"]), data=corpus, out=root / "f", name="audio",
                                  device="cpu", workers=0, progress=False)).store
    result, _ = train(root, corpus, [store], epochs=2, lr=1e-3, batch_size=4, select="ccc", gender_weight=0,
                      speaker_weight=0)
    yield Path(result.run_dir), corpus, Path(store)
    torch.set_num_threads(threads)


def test_predict_onto_the_corpus_label_file_is_refused(whisper_run, tmp_path):
    run, shared, _ = whisper_run
    corpus = shutil.copytree(shared, tmp_path / "corpus")
    labels = corpus / "Labels" / "labels_consensus.csv"
    before = labels.read_bytes()
    for extra in ([], ["--overwrite"]):  # --overwrite never lifts it
        r = invoke("predict", run, "--data", corpus, "--split", "Development", "--out", labels, "--device", "cpu",
                   *extra)
        assert r.exit_code == 2, r.output
        assert one_line(r) == (f"error: --out {labels}: lies inside an input (--data {corpus}); writing there could "
                               "damage it; choose another --out")
    assert labels.read_bytes() == before
    # Through a link: the path the link names is the label file.
    link = tmp_path / "preds.csv"
    link.symlink_to(labels)
    r = invoke("predict", run, "--data", corpus, "--split", "Development", "--out", link, "--device", "cpu",
               "--overwrite")
    assert r.exit_code == 2 and "lies inside an input (--data" in r.output, r.output
    assert labels.read_bytes() == before


def test_predict_onto_its_own_audio_file_is_refused(whisper_run, tmp_path):
    run, corpus, _ = whisper_run
    clip = tmp_path / "a.wav"
    shutil.copy(sorted((corpus / "Audios").iterdir())[0], clip)
    before = clip.read_bytes()
    r = invoke("predict", run, clip, "--out", clip, "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert one_line(r) == (f"error: --out {clip}: is also an input (the audio file {clip}); writing it would destroy "
                           "that input; choose another --out")
    assert clip.read_bytes() == before
    # The transcript beside a clip is read too.
    (tmp_path / "a.txt").write_text("a plain ordinary day\n")
    r = invoke("predict", run, clip, "--out", tmp_path / "a.txt", "--device", "cpu", "--overwrite")
    assert r.exit_code == 2 and f"is also an input (the transcript {tmp_path / 'a.txt'})" in r.output, r.output
    assert (tmp_path / "a.txt").read_text() == "a plain ordinary day\n"


def test_predict_onto_its_transcripts_table_is_refused(whisper_run, tmp_path):
    run, corpus, _ = whisper_run
    table = tmp_path / "t.csv"
    table.write_text("FileName,text\nMSP-PODCAST_test3_0001.wav,hello there\n")
    before = table.read_bytes()
    r = invoke("predict", run, "--data", corpus, "--split", "Development", "--transcripts", table, "--out", table,
               "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert one_line(r) == (f"error: --out {table}: is also an input (--transcripts {table}); writing it would destroy "
                           "that input; choose another --out")
    # The table given through a link, the output by its real name: the same file.
    link = tmp_path / "link.csv"
    link.symlink_to(table)
    r = invoke("predict", run, "--data", corpus, "--split", "Development", "--transcripts", link, "--out", table,
               "--device", "cpu", "--overwrite")
    assert r.exit_code == 2 and f"is also an input (--transcripts {link})" in r.output, r.output
    # A hard link: another name, the same inode.
    hard = tmp_path / "hard.csv"
    os.link(table, hard)
    r = invoke("predict", run, "--data", corpus, "--split", "Development", "--transcripts", table, "--out", hard,
               "--device", "cpu", "--overwrite")
    assert r.exit_code == 2 and f"is also an input (--transcripts {table})" in r.output, r.output
    assert table.read_bytes() == before


def test_evaluate_onto_the_runs_config_is_refused_and_its_own_file_needs_overwrite(whisper_run, tmp_path):
    shared, corpus, _ = whisper_run
    run = shutil.copytree(shared, tmp_path / "run")
    config = run / layout.CONFIG
    before = config.read_bytes()
    r = invoke("evaluate", run, "--data", corpus, "--split", "Development", "--out", config, "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert one_line(r) == (f"error: --out {config}: lies inside an input (the run {run}); writing there could damage "
                           "it; choose another --out")
    assert config.read_bytes() == before

    # The run keeps its evaluations: RUN/eval_<split>.json is evaluate's own file there ...
    r = invoke("evaluate", run, "--data", corpus, "--split", "Development", "--device", "cpu")
    assert r.exit_code == 0, r.output
    first = (run / "eval_Development.json").read_bytes()
    # ... which a second evaluation replaces only with --overwrite.
    r = invoke("evaluate", run, "--data", corpus, "--split", "Development", "--device", "cpu")
    assert r.exit_code == 2
    assert one_line(r) == (f"error: --out {run / 'eval_Development.json'}: exists; pass --overwrite to replace it, "
                           "or choose another --out")
    assert (run / "eval_Development.json").read_bytes() == first
    r = invoke("evaluate", run, "--data", corpus, "--split", "Development", "--device", "cpu", "--overwrite")
    assert r.exit_code == 0, r.output
    # Any other file inside the run is refused, even a new one.
    r = invoke("evaluate", run, "--data", corpus, "--split", "Development", "--out", run / "mine.json")
    assert r.exit_code == 2 and "lies inside an input (the run" in r.output, r.output


def test_export_replaces_a_file_only_with_overwrite(whisper_run, tmp_path):
    _, _, store = whisper_run
    dest = tmp_path / "kept.h5"
    dest.write_bytes(b"someone's file")
    r = invoke("export", store, "--out", dest)
    assert r.exit_code == 2
    assert one_line(r) == f"error: --out {dest}: exists; pass --overwrite to replace it, or choose another --out"
    assert dest.read_bytes() == b"someone's file"
    r = invoke("export", store, "--out", dest, "--overwrite")
    assert r.exit_code == 0, r.output
    assert dest.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"


def test_a_store_or_run_read_by_a_reader_takes_no_output_inside_it(whisper_run, tmp_path):
    run, corpus, store = whisper_run
    for args, inside in [
        (["export", store, "--out", store / "x.h5"], f"the store {store}"),
        (["predict", run, "--data", corpus, "--split", "Development", "--out", store / "p.csv"],
         f"the store {store} that the run reads"),
        (["evaluate", run, "--data", corpus, "--split", "Development", "--plots", run / "figs"], f"the run {run}"),
        (["plot", "run", run, "--out", run / "figs"], f"the run {run}"),
    ]:
        r = invoke(*args)
        assert r.exit_code == 2, (args, r.output)
        assert f": lies inside an input ({inside}); writing there could damage it" in one_line(r), args
    assert not (store / "x.h5").exists() and not (store / "p.csv").exists() and not (run / "figs").exists()


# --------------------------------------------------------------------------- every writer, before any work


def _members(tmp_path: Path) -> list[Path]:
    files = []
    for name in ("a.csv", "b.csv"):
        files.append(tmp_path / name)
        files[-1].write_text("FileName,EmoAct,EmoVal,EmoDom\nx.wav,4,4,4\ny.wav,3,3,3\n")
    return files


def _fake_run(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / layout.CONFIG).write_text(json.dumps({"format": layout.RUN_FORMAT, "inputs": []}))
    return folder


EXISTING = {
    # command: (arguments, the file that exists, the option named)
    "predict": (lambda t: ["predict", _fake_run(t / "run"), "--data", t / "c", "--split", "Test1", "--out",
                           t / "o.csv"],
                "o.csv", "--out"),
    "evaluate": (lambda t: ["evaluate", _fake_run(t / "run"), "--data", t / "c", "--split", "Test1", "--out",
                            t / "o.json"], "o.json", "--out"),
    "evaluate --plots": (lambda t: ["evaluate", _fake_run(t / "run"), "--data", t / "c", "--split", "Test1", "--out",
                                    t / "o.json", "--plots", t / "figs"], "figs/scatter.png", "--plots"),
    "ensemble": (lambda t: ["ensemble", *_members(t), "--out", t / "o.csv"], "o.csv", "--out"),
    "ensemble --plots": (lambda t: ["ensemble", *_members(t), "--out", t / "o.csv", "--plots", t / "figs"],
                         "figs/ensemble.png", "--plots"),
    "export": (lambda t: ["export", t / "s.zarr", "--out", t / "o.h5"], "o.h5", "--out"),
    "plot run": (lambda t: ["plot", "run", _fake_run(t / "run"), "--out", t / "figs"], "figs/curves.png", "--out"),
    "plot run (the run itself)": (lambda t: ["plot", "run", _fake_run(t / "run")], "run/curves.png", "--out"),
    "plot speakers": (lambda t: ["plot", "speakers", t / "s.zarr", "--data", t / "c", "--out", t / "o.png"],
                      "o.png", "--out"),
    "plot speakers --svg": (lambda t: ["plot", "speakers", t / "s.zarr", "--data", t / "c", "--svg", "--out",
                                       t / "o.png"], "o.svg", "--out"),
    "transcribe": (lambda t: ["transcribe", "--data", t / "c", "--model", t / "nope", "--out", t / "o.csv"],
                   "o.csv", "--out"),
    "bench extract --json": (lambda t: ["bench", "extract", "--random-init", "--utterances", 0, "--json", t / "o.json"],
                             "o.json",
                             "--json"),
}


@pytest.mark.parametrize("command", list(EXISTING))
def test_every_writer_refuses_to_replace_a_file_without_overwrite(command, tmp_path):
    build, existing, option = EXISTING[command]
    args = build(tmp_path)
    target = tmp_path / existing
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"kept")
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    line = one_line(r)
    assert line.startswith(f"error: {option} ") and f"{target}" in line, line
    assert line.endswith(f"exists; pass --overwrite to replace it, or choose another {option}"), line
    assert target.read_bytes() == b"kept"


def _store(t: Path) -> Path:
    (t / "s.zarr").mkdir(parents=True, exist_ok=True)
    return t / "s.zarr"


def _corpus(t: Path) -> Path:
    (t / "c" / "Labels").mkdir(parents=True, exist_ok=True)
    return t / "c"


INSIDE = {
    # command: (arguments, the output, the input it lies in, or is)
    "train-heads": (lambda t: ["train-heads", "--features", _store(t), "--data", t / "m.csv", "--out",
                               t / "s.zarr" / "run"],
                    "s.zarr/run", "--features {t}/s.zarr"),
    "train-heads --data": (lambda t: ["train-heads", "--features", t / "x.zarr", "--data", _corpus(t), "--out",
                                      t / "c" / "run"], "c/run", "--data {t}/c"),
    "train-heads --overwrite over its input": (
        lambda t: ["train-heads", "--features", _store(t / "old"), "--data", t / "m.csv", "--out", t / "old",
                   "--overwrite"], "old", "--features {t}/old/s.zarr"),
    "sweep": (lambda t: ["sweep", "--features", _store(t), "--data", t / "m.csv", "--out", t / "s.zarr" / "sw"],
              "s.zarr/sw", "--features {t}/s.zarr"),
    "train-heads --tensorboard": (lambda t: ["train-heads", "--features", _store(t), "--data", t / "m.csv", "--out",
                                             t / "run", "--tensorboard", t / "s.zarr" / "tb"], "s.zarr/tb",
                                  "--features {t}/s.zarr"),
    "finetune wavlm --init-from": (lambda t: ["finetune", "wavlm", "--data", t / "m.csv", "--init-from",
                                              _fake_run(t / "r"), "--out", t / "r" / "ft"], "r/ft",
                                              "--init-from {t}/r"),
    "finetune wavlm --text-features": (lambda t: ["finetune", "wavlm", "--data", t / "m.csv", "--text-features",
                                                  _store(t), "--out", t / "s.zarr"], "s.zarr",
                                       "--text-features {t}/s.zarr"),
    "extract": (lambda t: ["extract", "--model", "whisper-large-v3", "--data", _corpus(t), "--out", t / "c" / "f"],
                "c/f", "--data {t}/c"),
    "extract --model": (lambda t: ["extract", "--model", _store(t), "--data", t / "m.csv", "--out", t / "s.zarr"],
                        "s.zarr", "--model {t}/s.zarr"),
    "transcribe": (lambda t: ["transcribe", "--data", _corpus(t), "--out", t / "c" / "asr.csv"], "c/asr.csv",
                   "--data {t}/c"),
    "import vox-profile": (lambda t: ["import", "vox-profile", _store(t), "--out", t / "s.zarr" / "run"],
                           "s.zarr/run", "the checkpoint {t}/s.zarr"),
    "plot speakers": (lambda t: ["plot", "speakers", _store(t), "--data", t / "m.csv", "--out", t / "s.zarr" / "f.png"],
                      "s.zarr/f.png", "the store {t}/s.zarr"),
    "ensemble --data": (lambda t: ["ensemble", *_members(t), "--data", _corpus(t), "--split", "Test1", "--out",
                                   t / "c" / "Labels" / "labels_consensus.csv"], "c/Labels/labels_consensus.csv",
                        "--data {t}/c"),
    "ensemble": (lambda t: ["ensemble", *_members(t), "--out", t / "b.csv", "--overwrite"], "b.csv",
                 "the member {t}/b.csv"),
    "bench extract --json": (lambda t: ["bench", "extract", "--random-init", "--utterances", 0, "--config", t / "a.csv",
                                        "--json", t / "a.csv", "--overwrite"], "a.csv", "--config {t}/a.csv"),
}


@pytest.mark.parametrize("command", list(INSIDE))
def test_every_writer_refuses_an_output_that_is_or_lies_inside_an_input(command, tmp_path):
    build, output, label = INSIDE[command]
    args = build(tmp_path)
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    line = one_line(r)
    assert line.startswith("error: --") and f"{tmp_path / output}: " in line, line
    assert f"({label.format(t=tmp_path)})" in line, line
    assert any(w in line for w in ("is also an input", "lies inside an input", "holds an input")), line


def test_the_ensemble_library_call_refuses_a_member_as_its_output(tmp_path):
    from ser_cache.runs.ensemble import EnsembleError, ensemble

    a, b = _members(tmp_path)
    with pytest.raises(EnsembleError, match=r"is also an input \(the member .*a.csv\)"):
        ensemble([a, b], out=tmp_path / "." / "a.csv")


def test_transcribe_still_continues_its_own_table_without_overwrite(tmp_path):
    # Not a refusal: a table with its settings file beside it is transcribe's own, which a rerun continues
    # (or refuses, naming the settings that differ); only a foreign file needs --overwrite.
    table = tmp_path / "asr.csv"
    table.write_text("FileName,text\n")
    (tmp_path / "asr.csv.json").write_text("{}")
    r = invoke("transcribe", "--data", tmp_path / "nothing", "--model", tmp_path / "nope", "--out", table)
    assert r.exit_code == 2 and "exists; pass --overwrite" not in r.output and "nothing" in r.output, r.output


def test_bench_workdir_holding_someone_elses_folders_is_refused(tmp_path):
    from ser_cache.features.bench import BenchConfig, BenchError, bench_extract

    from factories import TINY_WHISPER

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_WHISPER))
    work = tmp_path / "project"
    (work / "corpus").mkdir(parents=True)
    (work / "corpus" / "my-notes.txt").write_text("mine")  # the benchmark would have emptied corpus/
    cfg = BenchConfig(config=config, utterances=2, device="cpu", workers=0, workdir=work, random_init=True)
    with pytest.raises(BenchError, match=f"--workdir {work}: not empty and not made by `ser-cache bench extract`"):
        bench_extract(cfg)
    assert (work / "corpus" / "my-notes.txt").read_text() == "mine"
    # A workdir the benchmark made itself is still reused:
    # test_bench.py::test_workdir_reuses_the_model_and_corpus_only_when_they_match


# --------------------------------------------------------------------------- --overwrite of a run, interrupted


@pytest.fixture
def pooled(tmp_path):
    manifest, ids, feats = make_corpus(tmp_path / "corpus", 120)
    store = make_store(tmp_path / "f" / "audio.zarr", ids, feats["audio"])
    return manifest, store


def _train(tmp_path, manifest, store, out, **kw):
    result, _ = train(tmp_path, manifest, [store], name=out, epochs=2, gender_weight=0, speaker_weight=0, **kw)
    return Path(result.run_dir)


def _seed(run: Path) -> int:
    return json.loads((run / layout.CONFIG).read_text())["train"]["seed"]


def test_a_kill_between_the_renames_is_undone_by_the_next_command(pooled, tmp_path, caplog):
    manifest, store = pooled
    run = _train(tmp_path, manifest, store, "run", seed=0)
    newer = _train(tmp_path, manifest, store, "newer", seed=1)
    # What `train-heads --overwrite` leaves when killed between its renames: the old run moved aside,
    # the new one complete but not in place, no run at --out.
    pid = dead_pid()
    os.replace(run, tmp_path / f".run.replaced-{pid}")
    os.replace(newer, tmp_path / f".run.training-{pid}")
    assert hidden(tmp_path) == [f".run.replaced-{pid}", f".run.training-{pid}"]

    with caplog.at_level(logging.WARNING, logger="ser_cache"):
        r = invoke("predict", run, "--data", manifest, "--split", "Test1", "--out", tmp_path / "p.csv",
                   "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert _seed(run) == 0 and hidden(tmp_path) == []  # the run as it was before the interrupted command
    messages = " ".join(rec.getMessage() for rec in caplog.records)
    assert f"restored the run an interrupted --overwrite had moved aside (.run.replaced-{pid})" in messages
    assert f"removed .run.training-{pid}, the unfinished folder of a run that was interrupted" in messages


def test_train_heads_after_such_a_kill_finds_the_old_run_and_cleans_up(pooled, tmp_path):
    manifest, store = pooled
    run = _train(tmp_path, manifest, store, "run", seed=0)
    pid = dead_pid()
    os.replace(run, tmp_path / f".run.replaced-{pid}")
    (tmp_path / f".run.training-{pid}").mkdir()  # killed while training: a half-written folder
    common = ["--features", store, "--data", manifest, "--out", run, "--epochs", 2, "--device", "cpu", "--threads", 1,
              "--no-progress", "--gender-weight", 0, "--speaker-weight", 0]
    r = invoke("train-heads", *common)
    assert r.exit_code == 2 and "a run already exists there; pass --overwrite" in r.output, r.output
    assert _seed(run) == 0 and hidden(tmp_path) == []
    r = invoke("train-heads", *common, "--overwrite", "--seed", 5)
    assert r.exit_code == 0, r.output
    assert _seed(run) == 5 and hidden(tmp_path) == []


def test_an_old_run_left_beside_a_finished_overwrite_is_removed(pooled, tmp_path):
    manifest, store = pooled
    run = _train(tmp_path, manifest, store, "run", seed=0)
    pid = dead_pid()
    shutil.copytree(run, tmp_path / f".run.replaced-{pid}")  # killed while removing the replaced run
    staging.check_run_target(run, overwrite=True)
    assert _seed(run) == 0 and hidden(tmp_path) == []


def test_a_staging_folder_of_a_live_process_is_left_alone(pooled, tmp_path):
    manifest, store = pooled
    run = _train(tmp_path, manifest, store, "run", seed=0)
    os.replace(run, tmp_path / f".run.replaced-{os.getppid()}")  # a process that still runs
    staging.check_run_target(run, overwrite=False)
    assert not run.exists() and hidden(tmp_path) == [f".run.replaced-{os.getppid()}"]


def test_a_failure_between_the_renames_puts_the_old_run_back(pooled, tmp_path, monkeypatch):
    manifest, store = pooled
    run = _train(tmp_path, manifest, store, "run", seed=0)
    real = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".run.training-"):
            raise OSError(5, "Input/output error", str(src))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        _train(tmp_path, manifest, store, "run", seed=1, overwrite=True)
    monkeypatch.setattr(os, "replace", real)
    assert _seed(run) == 0 and hidden(tmp_path) == []


def test_overwrite_through_a_symlinked_out_replaces_the_target_and_keeps_the_link(pooled, tmp_path):
    manifest, store = pooled
    target = _train(tmp_path, manifest, store, "runs-2024/run", seed=0)
    link = tmp_path / "latest"
    link.symlink_to(target, target_is_directory=True)
    r = invoke("train-heads", "--features", store, "--data", manifest, "--out", link, "--overwrite", "--seed", 3,
               "--epochs", 2, "--device", "cpu", "--threads", 1, "--no-progress", "--gender-weight", 0,
               "--speaker-weight", 0)
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and Path(os.readlink(link)) == target
    assert _seed(target) == 3
    assert hidden(tmp_path) == [] and hidden(target.parent) == []
