"""The MSP-Podcast reader: Audios/, Labels/labels_consensus.csv and Transcripts/ as `Utterance` records;
audio files the labels do not list become Test3 (named so) or Unlabeled."""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Literal

from ser_cache.data.manifest import MANIFEST_COLUMNS
from ser_cache.data.records import (
    DEFAULT_SCALE,
    CorpusError,
    OutOfScale,
    Utterance,
    csv_header,
    csv_rows,
    emotion_code,
    format_scale,
    known_value,
    label_value,
    leaves_folder,
    log_excluded,
    outside_scale,
    read_utf8,
    scale_argument,
)

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
# Audio files in Audios/ that labels_consensus.csv does not list: the challenge's unlabeled test
# set when the file name says so (MSP-PODCAST_test3_0001.wav; the challenge's baseline picks them
# with `'test3' in filename`), any other unlisted file is just unlabeled audio, kept out of Test3 so
# that a stray file never becomes a row of the submission.
TEST3_SPLIT = "Test3"
TEST3_MARK = "test3"  # matched case-insensitively anywhere in the file name
UNLISTED_SPLIT = "Unlabeled"
MSP_LABEL_FILE = Path("Labels") / "labels_consensus.csv"
MSP_COLUMNS = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set")
MSP_REQUIRED = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "Split_Set")  # SpkrID, Gender may be absent
_SKIPPED_SHOWN = 10  # skipped file names named in the log line


def read_msp_podcast(
    root: Path,
    *,
    label_scale: tuple[float, float] | Literal["none"] | None = None,
    out_of_scale: OutOfScale = "error",
) -> list[Utterance]:
    """Read the MSP-Podcast v1.12 layout: Audios/, Labels/labels_consensus.csv, Transcripts/.

    Labels must lie on `label_scale` (default 1-7); see `load_corpus`.
    """
    root = Path(root)
    audio_dir = root / "Audios"
    label_file = root / MSP_LABEL_FILE
    transcript_dir = root / "Transcripts"
    if not audio_dir.is_dir() and not label_file.is_file():
        raise CorpusError(
            f"{root}: not an MSP-Podcast layout (expected Audios/ and {MSP_LABEL_FILE}); "
            "for other corpora pass a CSV manifest with --data: one row per utterance, a path column "
            f"(audio file) and optionally {', '.join(c for c in MANIFEST_COLUMNS if c != 'path')}"
        )
    if not audio_dir.is_dir():
        raise CorpusError(f"{root}: no Audios/ folder; the MSP-Podcast layout keeps the audio of every "
                          f"turn that {MSP_LABEL_FILE} lists in {audio_dir}")
    audio_files = _scan_audio(audio_dir)
    if not audio_files:
        raise CorpusError(f"{audio_dir}: no audio files ({', '.join(AUDIO_SUFFIXES)}); the MSP-Podcast layout "
                          "keeps the audio of every turn there")
    scale = DEFAULT_SCALE if label_scale is None else scale_argument(label_scale)
    utts: list[Utterance] = []
    seen: set[str] = set()
    excluded: list[str] = []
    if label_file.is_file():
        text = read_utf8(label_file)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = csv_header(reader, label_file)
        missing = [c for c in MSP_REQUIRED if c not in fields]
        if missing:
            raise CorpusError(f"{label_file}: missing column(s) {', '.join(missing)}; found "
                              f"{', '.join(fields) or 'no header'}; "
                              f"expected {', '.join(MSP_COLUMNS)}")
        for lineno, row in csv_rows(reader, label_file):
            name = (row.get("FileName") or "").strip()
            if not name:
                raise CorpusError(f"{label_file}, line {lineno}: empty FileName")
            if name in seen:
                raise CorpusError(f"{label_file}, line {lineno}: FileName {name} is listed twice")
            seen.add(name)  # an excluded row's audio must not come back as an unlisted file
            outside = leaves_folder(name, absolute_ok=False)
            if outside:
                raise CorpusError(f"{label_file}, line {lineno}: FileName {name!r} is {outside}; a FileName names "
                                  f"a file inside {audio_dir}")
            avd = [label_value(row.get(c), label_file, lineno, c, nan_is_missing=False)
                   for c in ("EmoAct", "EmoVal", "EmoDom")]
            bad = outside_scale(row, ("EmoAct", "EmoVal", "EmoDom"), avd, scale)
            if bad:
                if out_of_scale == "error":
                    raise CorpusError(f"{label_file}, line {lineno}: {bad} is outside the scale {format_scale(scale)}")
                excluded.append(f"line {lineno} ({name}: {bad})")
                continue
            stem = Path(name).stem
            utts.append(
                Utterance(
                    id=name,
                    path=audio_dir / name,
                    split=(row.get("Split_Set") or "").strip() or None,
                    emotion=emotion_code(row.get("EmoClass")),
                    arousal=avd[0],
                    valence=avd[1],
                    dominance=avd[2],
                    speaker=known_value(row.get("SpkrID")),
                    gender=known_value(row.get("Gender")),
                    transcript=transcript_dir / f"{stem}.txt",
                )
            )
        log_excluded(label_file, excluded, scale)
    unlisted = {TEST3_SPLIT: 0, UNLISTED_SPLIT: 0}
    for name, path in audio_files.items():
        if name not in seen:
            split = unlisted_split(name)
            unlisted[split] += 1
            utts.append(Utterance(id=name, path=path, split=split,
                                  transcript=transcript_dir / f"{Path(name).stem}.txt"))
    if any(unlisted.values()):
        log.info("%s: %d audio file(s) not in %s: %d named as Test3 (split %s), %d others (split %s)",
                 audio_dir, sum(unlisted.values()), MSP_LABEL_FILE, unlisted[TEST3_SPLIT], TEST3_SPLIT,
                 unlisted[UNLISTED_SPLIT], UNLISTED_SPLIT)
    return utts


def unlisted_split(file_name: str) -> str:
    """The split of an audio file that the labels do not list: Test3 if its name contains `test3`
    (any case), else Unlabeled."""
    return TEST3_SPLIT if TEST3_MARK in file_name.lower() else UNLISTED_SPLIT


def _scan_audio(audio_dir: Path) -> dict[str, Path]:
    """The audio files of `audio_dir` by name. A name that is not valid UTF-8 (Python hands it over
    with surrogate escapes) is skipped with a warning: such an id could be written nowhere (stores,
    CSV files), and one badly named file should not stop a 100k-file corpus."""
    out = {}
    skipped: list[str] = []
    with os.scandir(audio_dir) as it:
        for entry in it:
            if not (entry.name.lower().endswith(AUDIO_SUFFIXES) and entry.is_file()):
                continue
            if not _is_utf8(entry.name):
                skipped.append(repr(os.fsencode(entry.name)))
                continue
            out[entry.name] = Path(entry.path)
    if skipped:
        skipped.sort()
        more = f" and {len(skipped) - _SKIPPED_SHOWN} more" if len(skipped) > _SKIPPED_SHOWN else ""
        log.warning("%s: skipped %d audio file(s) whose names are not valid UTF-8; rename them to use them: %s%s",
                    audio_dir, len(skipped), ", ".join(skipped[:_SKIPPED_SHOWN]), more)
    return out


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
