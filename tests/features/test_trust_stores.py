"""Stores and extraction to be trusted: a resumed extract equals an uninterrupted one byte for byte,
damaged frame counts are caught (one line, and by `info --verify`), Ctrl-C always ends extract,
and options or messages that misled (--window on WavLM, "0.0 utt/s", "0.0 MB", plot speakers on
another corpus's store)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from ser_cache.cli.app import INTERRUPTED, app
from ser_cache.features import decoding, encode
from ser_cache.features.errors import StoreError
from ser_cache.features.extract import ExtractConfig, extract
from ser_cache.features.store import FeatureStore

from factories import msp_corpus
from processes import ENDS_WITHIN, ended_within, start_blocked

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def cfg(model, data, out, **kw):
    base = dict(model=str(model), data=data, out=out, device="cpu", workers=0, progress=False)
    base.update(kw)
    return ExtractConfig(**base)


# --------------------------------------------------------------------------- resume is byte-identical


def _recording_batches(monkeypatch) -> list[tuple[int, ...]]:
    """Record the rows of every batch the encoder is given, in order."""
    seen: list[tuple[int, ...]] = []
    original = encode._encode_stream

    def recording(encoder, batches, resolve, timings):
        def spy():
            for item in batches:
                seen.append(tuple(item[0]))
                yield item

        return original(encoder, spy(), resolve, timings)

    monkeypatch.setattr(encode, "_encode_stream", recording)
    return seen


@pytest.mark.parametrize("pooling", [pytest.param("frames", marks=pytest.mark.slow), "mean"])
def test_a_resumed_extract_is_byte_identical_although_the_rest_would_batch_differently(models, tmp_path, monkeypatch,
                                                                                      pooling):
    """40 clips of 1-4 s in chunks of 2: the first unit of chunks (5 of the 20) is cut short at its
    third chunk write. Planned from the 18 chunks left, the rest would be grouped and sorted from
    another starting chunk, and WavLM's rows move with their batch's padding (the frame store by
    float16 steps). Planned from the whole store, every batch the resumed run encodes is one of the
    uninterrupted run's, and the arrays are equal byte for byte."""
    data = msp_corpus(tmp_path / "c", n=40, unlabeled=0)
    options = dict(pooling=pooling, chunk_rows=2, batch_seconds=8.0)
    batches = _recording_batches(monkeypatch)
    ref = extract(cfg(models["wavlm"], data, tmp_path / "ref", **options))
    uninterrupted = set(batches)

    calls = {"n": 0}
    original = FeatureStore.write_chunk

    def interrupted_at_the_third_chunk(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as a Ctrl-C mid-run would
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_chunk", interrupted_at_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg(models["wavlm"], data, tmp_path / "run", **options))
    monkeypatch.setattr(FeatureStore, "write_chunk", original)
    batches.clear()
    resumed = extract(cfg(models["wavlm"], data, tmp_path / "run", **options))
    assert resumed.skipped == 4 and resumed.computed == 36

    a, b = FeatureStore.open(ref.store), FeatureStore.open(resumed.store)
    for x, y in zip(a.read(), b.read()):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), f"{int((x != y).sum())} value(s) differ"
    if pooling == "frames":
        assert a.frame_counts().tobytes() == b.frame_counts().tobytes()
    # What makes it so (and what the pooled store, less sensitive here, depends on as well):
    assert set(batches) <= uninterrupted, "the resumed run encoded rows in batches an uninterrupted run never forms"


def test_the_batch_plan_does_not_depend_on_what_is_done(tmp_path):
    """The units of chunks come from the store's layout (every chunk, in order) and the number of ranks alone."""
    store = FeatureStore.create(tmp_path / "s.zarr", [f"u{i}" for i in range(40)], (3, 32), {}, chunk_rows=2)
    plan = encode.plan_units(store, world=1)
    assert [c for unit in plan for c in unit] == list(range(store.n_chunks))
    assert len(plan) == 4  # 20 chunks, about four units per rank
    assert encode.plan_units(store, world=2) != plan  # ranks are part of it (docs/extract.md says so)


# --------------------------------------------------------------------------- Ctrl-C always ends extract

# The extract of test_faults.py, whose decoding worker blocks for 600 s; here Ctrl-C's signal is
# handed to a thread other than the main one, as the kernel may do with a signal sent to a process.
EXTRACT_SIGNAL_TO_A_THREAD = '''
import faulthandler, os, signal, sys, threading, time
if __name__ == "__main__":  # spawned workers import this file again
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the stacks, should the test find it stuck
    sys.path.insert(0, sys.argv.pop(1))
    import slow
    from ser_cache.data import audio
    audio.load_many = slow.load_many

    def interrupt_this_thread():
        while not os.path.exists(os.environ["SER_CACHE_TEST_MARKER"]):
            time.sleep(0.05)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    threading.Thread(target=interrupt_this_thread, daemon=True).start()
    from ser_cache.cli.app import main
    sys.argv = ["ser-cache", *sys.argv[1:]]
    main()
'''


@pytest.mark.slow
def test_ctrl_c_received_by_another_thread_still_ends_extract_at_once(models, tmp_path):
    """The main thread waits for decoded batches; a SIGINT whose handler ran in another thread used
    to wait until that batch was decoded (here 600 s). Now it ends the run within a wait slice."""
    corpus = msp_corpus(tmp_path / "corpus", n=4, unlabeled=0)
    proc, _ = start_blocked(tmp_path, EXTRACT_SIGNAL_TO_A_THREAD,
                            ["extract", "--model", str(models["whisper"]), "--data", str(corpus), "--out",
                             str(tmp_path / "f"),
                             "--device", "cpu", "--workers", "1", "--no-progress"])
    output = ended_within(proc, ENDS_WITHIN)
    assert proc.returncode == 130 and output.strip() == INTERRUPTED, output


def test_waiting_for_a_future_lets_a_pending_interrupt_through():
    """`wait_result` returns what the future holds, raises what it raised (a TimeoutError of its own
    included, which a result(timeout=...) loop would mistake for its own slice running out)."""
    from concurrent.futures import Future

    done = Future()
    done.set_result(3)
    assert decoding.wait_result(done) == 3
    failed = Future()
    failed.set_exception(TimeoutError("the decoder's own"))
    with pytest.raises(TimeoutError, match="the decoder's own"):
        decoding.wait_result(failed)


# --------------------------------------------------------------------------- frame counts rewritten


def _set_count(store_path, row: int, value: int) -> None:
    """Rewrite one row's frame count through Zarr, as a tool editing the store would: the chunk's
    checksum is recomputed, so only the count itself can tell."""
    counts = zarr.open_group(str(store_path), mode="r+")["frames"]
    values = np.asarray(counts[:])
    values[row] = value
    counts[:] = values


@pytest.fixture(scope="module")
def frame_run(tmp_path_factory):
    """A labelled corpus, a frame store of it (chunks of 16 rows) and a run trained on the intact store."""
    from synthetic import make_frame_corpus, make_frame_store

    root = tmp_path_factory.mktemp("frame-run")
    manifest, ids, frames, _ = make_frame_corpus(root / "corpus", n=60)
    store = make_frame_store(root / "features" / "audio-frames.zarr", ids, frames, chunk_rows=16)
    r = invoke("train-heads", "-f", store, "-d", manifest, "-o", root / "run", "--epochs", 1, "--device", "cpu",
               "--threads", 1, "--no-progress")
    assert r.exit_code == 0, r.output
    return manifest, store, root / "run"


# (what the count of row 5 becomes, what the one line says)
DAMAGE = {
    "negative": (lambda n, t: -3, "holds frame count -3 for row 5, outside 0–"),
    "beyond the cap": (lambda n, t: t + 40, "outside 0–"),
    "too large": (lambda n, t: n + 2, "is all zeros: the count is larger than the frames written"),
    "too small": (lambda n, t: n - 2, "past the count, is not all zeros: the count is smaller"),
    "zero": (lambda n, t: 0, "frame 0, past the count, is not all zeros"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_frame_counts_rewritten_with_valid_checksums_are_one_line_and_caught_by_verify(frame_run, tmp_path, damage):
    import shutil

    manifest, intact, run = frame_run
    store = tmp_path / "features" / intact.name
    shutil.copytree(intact, store)
    count, message = DAMAGE[damage]
    n = int(FeatureStore.open(store).frame_counts()[5])
    t_max = FeatureStore.open(store).feature_shape[0]
    _set_count(store, 5, count(n, t_max))  # row 5 is in the Train split, which both commands read

    with pytest.raises(StoreError, match="row 5"):
        FeatureStore.open(store).read_frames()
    verify = invoke("info", "--verify", store)
    assert verify.exit_code == 1, verify.output
    assert "frames chunk 0" in verify.output and message in verify.output
    for args in (["train-heads", "-f", store, "-d", manifest, "-o", tmp_path / "again", "--epochs", 1,
                  "--device", "cpu", "--threads", 1, "--no-progress"],
                 ["predict", run, "-d", manifest, "-s", "Train", "-o", tmp_path / "p.csv", "--features-dir",
                  store.parent, "--device", "cpu"]):
        r = invoke(*args)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert f"error: {store}" in r.output and "row 5" in r.output and message in " ".join(r.output.split())
    assert not (tmp_path / "p.csv").exists()


def test_info_still_summarises_a_store_with_a_count_out_of_range_and_warns(frame_run, tmp_path):
    import shutil

    _, intact, _ = frame_run
    store = tmp_path / intact.name
    shutil.copytree(intact, store)
    _set_count(store, 20, 10**6)
    r = invoke("info", store)
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "warning" in r.output and "frames chunk 1" in r.output and "row 20" in r.output
    assert "frames per row" in r.output  # the table is still there


# --------------------------------------------------------------------------- options and messages


def test_window_on_a_wavlm_model_is_refused_not_ignored(models, tmp_path):
    corpus = msp_corpus(tmp_path / "c", n=4, unlabeled=0)
    for window in ("window", "trimmed"):
        r = invoke("extract", "--model", models["wavlm"], "--data", corpus, "--out", tmp_path / "f", "--window", window,
                   "--device", "cpu", "--workers", 0, "--no-progress")
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert f"--window {window}" in r.output and "wavlm encoder" in r.output and "Whisper only" in r.output
    assert not list((tmp_path / "f").glob("*.zarr"))
    from ser_cache.encoders import EncoderError, load_encoder

    with pytest.raises(EncoderError, match="--window trimmed"):
        load_encoder(str(models["xvector"]), window="trimmed", device="cpu")


def test_a_rerun_with_nothing_to_do_says_so_instead_of_a_rate(models, tmp_path):
    corpus = msp_corpus(tmp_path / "c", n=4, unlabeled=0)
    first = sorted((corpus / "Audios").iterdir())[0]
    first.write_bytes(b"RIFF....WAVEnot really audio")
    args = ["extract", "--model", models["whisper"], "--data", corpus, "--out", tmp_path / "f", "--device", "cpu",
            "--workers", 0, "--no-progress"]
    assert invoke(*args).exit_code == 0
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    text = " ".join(again.output.split())
    assert "nothing to do: all 4 rows were done before, 3 written; 1 failed" in text
    assert "--retry-failed" in text and "utt/s" not in text


def test_info_gives_sizes_in_a_unit_that_shows_them(tmp_path):
    from ser_cache.cli.stage_one import size_text

    from synthetic import make_store

    assert [size_text(n) for n in (0, 512, 7_250, 48_300_000, 1.2e9)] == ["0 B", "512 B", "7.25 kB", "48.3 MB",
                                                                          "1.20 GB"]
    store = make_store(tmp_path / "small.zarr", [f"u{i}" for i in range(8)], np.ones((8, 4), dtype=np.float32))
    r = invoke("info", store)
    assert r.exit_code == 0, r.output
    assert "0.0 MB" not in r.output and " kB" in r.output


def test_plot_speakers_on_another_corpus_store_says_the_rows_do_not_match(tmp_path):
    from ser_cache.cli.plot import plot_app

    from synthetic import speaker_corpus, speaker_store

    manifest, ids, labels = speaker_corpus(tmp_path / "corpus")
    other = speaker_store(tmp_path / "other.zarr", [f"other_{i}" for i in ids], labels, separated=True)
    r = runner.invoke(plot_app, ["speakers", str(other), "--data", str(manifest), "--speakers", "3",
                                 "--per-speaker", "4", "--out", str(tmp_path / "fig.png")])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    text = " ".join(r.output.split())
    assert "rows do not match --data" in text and f"0 of the store's {len(ids)} utterance ids" in text
    assert "lower --speakers" not in text and not (tmp_path / "fig.png").exists()
