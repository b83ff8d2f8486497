import numpy as np
import pytest
import soundfile as sf

from factories import tone, write_wav
from ser_cache import audio


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
