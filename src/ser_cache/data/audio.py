"""Audio loading: decode, mix to mono, resample to 16 kHz, crop. Pure functions, no torch.

Every encoder ser-cache runs (Whisper, WavLM, the x-vector model) was trained on 16 kHz mono,
so everything is brought there once, before batching.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000  # Hz, the rate of every audio encoder ser-cache supports
DEFAULT_MAX_SECONDS = 15.0  # the challenge winner cropped every utterance to its first 15 s


class AudioError(Exception):
    """An audio file could not be turned into a usable waveform; carries the file and the reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class AudioInfo:
    """What the file header says, read without decoding the samples."""

    sample_rate: int
    frames: int
    channels: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def info(path: str | Path) -> AudioInfo:
    """Read the header of an audio file; raises AudioError when it is missing, unreadable or a
    truncated WAV."""
    import soundfile as sf

    path = Path(path)
    _check_file(path)
    try:
        i = sf.info(str(path))
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioError(path, f"unreadable audio ({_one_line(exc)})") from None
    _check_wav_length(path)
    return AudioInfo(sample_rate=int(i.samplerate), frames=int(i.frames), channels=int(i.channels))


def read(path: str | Path, *, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode a file to float32 of shape (frames, channels) and its sample rate.

    With `max_seconds`, only the first `max_seconds` are decoded, so that a one-hour file
    does not cost one hour of decoding when the first 15 s are kept.
    """
    import soundfile as sf

    path = Path(path)
    _check_file(path)
    try:
        with sf.SoundFile(str(path)) as f:
            sr = int(f.samplerate)
            frames = -1 if max_seconds is None else int(np.ceil(max_seconds * sr))
            data = f.read(frames=frames, dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(path, f"unreadable audio ({_one_line(exc)})") from None
    # libsndfile shortens a WAV whose data chunk the file does not hold to what is there, without
    # a word; the header is read here to notice. (A cut FLAC fails to decode by itself; MP3 and
    # Ogg lengths are estimates or come from the last page present, so there is nothing to compare.)
    _check_wav_length(path)
    return data, sr


def to_mono(x: np.ndarray) -> np.ndarray:
    """Average the channels of a (frames, channels) array; a 1-D array is returned as is."""
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise ValueError(f"expected audio of shape (frames,) or (frames, channels), got {x.shape}")
    return x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono signal with soxr (high quality); a no-op when the rates agree."""
    if sr_in == sr_out:
        return x
    import soxr

    return soxr.resample(x, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)


def crop(x: np.ndarray, max_samples: int | None) -> np.ndarray:
    """Keep the first `max_samples` samples (the paper crops every utterance to its start)."""
    if max_samples is None or len(x) <= max_samples:
        return x
    return x[:max_samples]


def load(
    path: str | Path,
    *,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
) -> np.ndarray:
    """Decode, mix to mono, resample and crop: the waveform every audio encoder gets.

    Raises AudioError for a missing, unreadable, truncated, empty or non-finite file (and for a
    directory or a symlink loop given as a file), so that no bad waveform reaches an encoder and
    no NaN row reaches a store.
    """
    data, sr = read(path, max_seconds=max_seconds)
    if data.shape[0] == 0:
        raise AudioError(path, "empty audio (0 samples)")
    x = to_mono(data)
    if not np.isfinite(x).all():
        raise AudioError(path, "audio contains NaN or infinite samples")
    x = resample(x, sr, sample_rate)
    max_samples = None if max_seconds is None else int(round(max_seconds * sample_rate))
    x = crop(x, max_samples)
    if len(x) == 0:
        raise AudioError(path, "empty audio after resampling")
    return np.ascontiguousarray(x, dtype=np.float32)


def load_many(paths: list[str], *, max_seconds: float | None = DEFAULT_MAX_SECONDS,
              min_seconds: float = 0.0) -> list[tuple[np.ndarray | None, str | None]]:
    """`load` over several files, each one's failure turned into its reason: (waveform, None) or
    (None, reason). What a decoding worker process runs for one batch.

    A waveform shorter than `min_seconds` after cropping is a failure too (nothing to encode).
    """
    out: list[tuple[np.ndarray | None, str | None]] = []
    for path in paths:
        try:
            x = load(path, max_seconds=max_seconds)
        except AudioError as exc:
            out.append((None, exc.reason))
            continue
        if len(x) < min_seconds * SAMPLE_RATE:
            out.append((None, f"too short ({len(x) / SAMPLE_RATE:.3f} s; at least {min_seconds} s needed)"))
        else:
            out.append((x, None))
    return out


def _check_file(path: Path) -> None:
    """Raise AudioError saying why `path` is not a readable regular file (missing, a directory,
    a symlink loop, a broken symlink, no permission)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AudioError(path, "symlink loop (the link points back to itself)") from None
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise AudioError(path, f"broken symlink (points to {os.readlink(path)}, which does not exist)") from None
        if exc.errno == errno.ENOENT:
            raise AudioError(path, "file not found") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise AudioError(path, "permission denied") from None
        raise AudioError(path, f"cannot open ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioError(path, "is a directory, not an audio file")
    if not stat.S_ISREG(st.st_mode):
        raise AudioError(path, "not a regular file (a device, a pipe or a socket)")
    if not os.access(path, os.R_OK):
        raise AudioError(path, "permission denied")


_WAV_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # what streaming writers put in a data chunk of unknown length
_WAV_MAX_CHUNKS = 64  # a header with more chunks than this before `data` is not worth walking


def wav_data_frames(path: str | Path) -> tuple[int, int] | None:
    """For a RIFF/RIFX WAVE file: (frames its data chunk declares, frames the file holds).

    None when the file is not such a WAV, when the declared size is the "unknown" marker of a
    streamed file, or when the header cannot be walked (libsndfile then reports the file itself).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
                return None
            order = "<" if head[:4] == b"RIFF" else ">"
            file_size = os.fstat(f.fileno()).st_size
            block_align = 0
            for _ in range(_WAV_MAX_CHUNKS):
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                cid, size = chunk[:4], struct.unpack(order + "I", chunk[4:])[0]
                if cid == b"fmt ":
                    fmt = f.read(min(size, 16))
                    if len(fmt) < 14:
                        return None
                    block_align = struct.unpack(order + "H", fmt[12:14])[0]
                    f.seek(size - len(fmt) + (size & 1), os.SEEK_CUR)
                elif cid == b"data":
                    if not block_align or size in _WAV_UNKNOWN_SIZES:
                        return None
                    held = max(file_size - f.tell(), 0)
                    return size // block_align, min(size, held) // block_align
                else:
                    f.seek(size + (size & 1), os.SEEK_CUR)
    except (OSError, struct.error):
        return None
    return None


def _check_wav_length(path: Path) -> None:
    sizes = wav_data_frames(path)
    if sizes is not None and sizes[1] < sizes[0]:
        raise AudioError(path, f"truncated: header says {sizes[0]} samples, file holds {sizes[1]}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
