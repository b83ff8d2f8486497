import csv
import os
import struct

import numpy as np
import pytest
import soundfile as sf

from ser_cache.data import audio

from factories import msp_corpus, tone, write_wav


def test_mono_16k_passes_through_unchanged(tmp_path):
    x = tone(1.0)
    p = write_wav(tmp_path / "a.wav", x)
    y = audio.load(p)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=1 / 32768)  # 16-bit PCM quantisation


def test_stereo_is_averaged(tmp_path):
    x = tone(0.5, channels=2)
    p = write_wav(tmp_path / "s.wav", x)
    y = audio.load(p)
    assert y.ndim == 1
    np.testing.assert_allclose(y, x.mean(axis=1), atol=2 / 32768)


def test_44k1_is_resampled_to_16k(tmp_path):
    x = tone(2.0, sr=44_100, freq=440.0)
    p = write_wav(tmp_path / "h.wav", x, sr=44_100)
    y = audio.load(p)
    assert abs(len(y) - 32_000) <= 1
    # The dominant frequency survives resampling.
    spec = np.abs(np.fft.rfft(y))
    peak_hz = np.argmax(spec) * audio.SAMPLE_RATE / len(y)
    assert abs(peak_hz - 440.0 * 1.0) < 25


def test_crop_keeps_the_start(tmp_path):
    x = tone(3.0)
    p = write_wav(tmp_path / "l.wav", x)
    y = audio.load(p, max_seconds=1.25)
    assert len(y) == 20_000
    np.testing.assert_allclose(y, x[:20_000], atol=1 / 32768)


def test_pure_functions():
    st = np.stack([np.ones(4), -np.ones(4)], axis=1).astype(np.float32)
    assert np.all(audio.to_mono(st) == 0)
    assert audio.crop(np.arange(10), 3).tolist() == [0, 1, 2]
    assert audio.crop(np.arange(3), 10).tolist() == [0, 1, 2]
    x = np.random.default_rng(0).standard_normal(8000).astype(np.float32)
    assert audio.resample(x, 16_000, 16_000) is x
    assert len(audio.resample(x, 8_000, 16_000)) == 16_000


def test_missing_empty_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(audio.AudioError, match="file not found") as e:
        audio.load(tmp_path / "nope.wav")
    assert "nope.wav" in str(e.value)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype=np.float32), 16_000)
    with pytest.raises(audio.AudioError, match="empty"):
        audio.load(empty)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(audio.AudioError, match="unreadable") as e:
        audio.load(bad)
    assert e.value.path.endswith("bad.wav")


def test_non_finite_audio_is_refused(tmp_path):
    x = tone(0.5)
    x[100] = np.nan
    p = tmp_path / "nan.wav"
    sf.write(str(p), x, 16_000, subtype="FLOAT")
    with pytest.raises(audio.AudioError, match="NaN"):
        audio.load(p)


def test_info_reads_the_header(tmp_path):
    p = write_wav(tmp_path / "a.wav", tone(1.5, sr=22_050), sr=22_050)
    i = audio.info(p)
    assert i.sample_rate == 22_050 and i.channels == 1 and abs(i.seconds - 1.5) < 1e-3


def test_load_many_turns_each_failure_into_its_reason(tmp_path):
    good = write_wav(tmp_path / "good.wav", tone(1.0))
    short = write_wav(tmp_path / "short.wav", tone(0.01))
    out = audio.load_many([str(good), str(tmp_path / "missing.wav"), str(short)], min_seconds=0.05)
    assert np.array_equal(out[0][0], audio.load(good)) and out[0][1] is None
    assert out[1] == (None, "file not found")
    assert out[2][0] is None and out[2][1].startswith("too short (0.010 s")


# --------------------------------------------------------------------------- damaged files


def truncated_wav(path, seconds=1.0, keep=0.5, subtype="PCM_16"):
    """A WAV whose header announces `seconds` of audio while the file holds only `keep` of its bytes."""
    sf.write(str(path), tone(seconds), 16_000, subtype=subtype)
    os.truncate(path, int(os.path.getsize(path) * keep))
    return path


@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
def test_truncated_wav_is_refused_naming_both_lengths(tmp_path, subtype):
    p = truncated_wav(tmp_path / "cut.wav", subtype=subtype)
    held = len(sf.read(str(p))[0])  # what soundfile does alone: fewer samples, no error
    assert 7_900 < held < 8_000
    message = f"truncated: header says 16000 samples, file holds {held}"
    with pytest.raises(audio.AudioError, match=message) as e:
        audio.load(p)
    assert e.value.path.endswith("cut.wav")
    with pytest.raises(audio.AudioError, match=message):
        audio.load(p, max_seconds=0.1)  # even when the kept start is all there
    with pytest.raises(audio.AudioError, match=message):
        audio.info(p)
    assert audio.load_many([str(p)])[0] == (None, message)


def test_wav_of_unknown_length_from_a_stream_is_read_whole(tmp_path):
    p = write_wav(tmp_path / "stream.wav", tone(1.0))
    data = bytearray(p.read_bytes())
    at = data.index(b"data")
    data[at + 4:at + 8] = struct.pack("<I", 0xFFFFFFFF)  # what a writer that cannot seek leaves
    p.write_bytes(bytes(data))
    assert audio.wav_data_frames(p) is None
    assert len(audio.load(p)) == 16_000


def test_wav_with_a_chunk_after_the_data_is_not_truncated(tmp_path):
    p = write_wav(tmp_path / "list.wav", tone(1.0))
    with open(p, "ab") as f:
        f.write(b"LIST" + struct.pack("<I", 4) + b"INFO")
    assert audio.wav_data_frames(p) == (16_000, 16_000)
    assert len(audio.load(p)) == 16_000


def test_directory_symlink_loop_and_broken_symlink_say_what_they_are(tmp_path):
    (tmp_path / "dir.wav").mkdir()
    with pytest.raises(audio.AudioError, match="dir.wav: is a directory, not an audio file"):
        audio.load(tmp_path / "dir.wav")
    with pytest.raises(audio.AudioError, match="is a directory"):
        audio.info(tmp_path / "dir.wav")
    os.symlink(tmp_path / "loop_b.wav", tmp_path / "loop_a.wav")
    os.symlink(tmp_path / "loop_a.wav", tmp_path / "loop_b.wav")
    with pytest.raises(audio.AudioError, match="loop_a.wav: symlink loop"):
        audio.load(tmp_path / "loop_a.wav")
    with pytest.raises(audio.AudioError, match="symlink loop"):
        audio.info(tmp_path / "loop_a.wav")
    os.symlink(tmp_path / "gone.wav", tmp_path / "dangling.wav")
    with pytest.raises(audio.AudioError,
                       match=r"dangling.wav: broken symlink \(points to .*gone.wav, which does not exist\)"):
        audio.load(tmp_path / "dangling.wav")
    with pytest.raises(audio.AudioError, match="nope.wav: file not found"):
        audio.info(tmp_path / "nope.wav")


def test_truncated_wav_goes_to_the_extract_errors_report(models, tmp_path):
    from ser_cache.features.extract import ExtractConfig, extract
    from ser_cache.features.report import report_path

    data = msp_corpus(tmp_path / "c", n=4, unlabeled=0)
    name = sorted(p.name for p in (data / "Audios").iterdir())[1]
    os.truncate(data / "Audios" / name, os.path.getsize(data / "Audios" / name) // 2)
    r = extract(ExtractConfig(model=str(models["whisper"]), data=data, out=tmp_path / "f", device="cpu", workers=0,
                              progress=False))
    assert r.failed == 1
    with open(report_path(r.store), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["id"] for row in rows] == [name]
    assert rows[0]["reason"].startswith("truncated: header says ")
