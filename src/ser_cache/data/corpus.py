"""Reading a corpus: `load_corpus` picks the reader (a directory in the MSP-Podcast layout, msp_podcast.py;
a CSV manifest, manifest.py), both giving `Utterance` records (records.py), and keeps the splits asked for.

Every command (extract, train-heads, evaluate, predict) reads a corpus through `load_corpus`, so
an utterance has the same id, split and labels everywhere. The id is the corpus's own key: for
MSP-Podcast the FileName (`MSP-PODCAST_0002_0033.wav`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from ser_cache.data.manifest import read_manifest
from ser_cache.data.msp_podcast import read_msp_podcast
from ser_cache.data.records import CorpusError, OutOfScale, Utterance


def load_corpus(
    data: str | Path,
    splits: Sequence[str] | None = None,
    *,
    label_scale: tuple[float, float] | Literal["none"] | None = None,
    out_of_scale: OutOfScale = "error",
) -> list[Utterance]:
    """Read a corpus: a directory in the MSP-Podcast layout or a CSV manifest; optionally keep splits.

    Utterances come back sorted by id, so that every run sees the same order.

    `label_scale` is the (low, high) range every arousal/valence/dominance label must lie in, or
    "none" for no check; None means the corpus's own: 1-7 for MSP-Podcast, for a manifest the
    scale its first line declares, else 1-7. A label outside it is an error naming the file, line
    and column; with `out_of_scale="exclude"` such rows are left out instead and a warning counts
    them and names the first few.
    """
    data = Path(data)
    if out_of_scale not in ("error", "exclude"):
        raise CorpusError(f"out_of_scale={out_of_scale!r}: expected 'error' or 'exclude'")
    if data.is_dir():
        utts = read_msp_podcast(data, label_scale=label_scale, out_of_scale=out_of_scale)
    elif data.is_file():
        utts = read_manifest(data, label_scale=label_scale, out_of_scale=out_of_scale)
    else:
        raise CorpusError(f"--data {data}: no such directory or manifest file")
    utts.sort(key=lambda u: u.id)
    if splits:
        utts = select_splits(utts, splits, source=data)
    return utts


def select_splits(utts: Iterable[Utterance], splits: Sequence[str], *, source: Path | str = "") -> list[Utterance]:
    """Keep the utterances of the named splits (case-insensitive); an unknown split is an error."""
    utts = list(utts)
    available = sorted({u.split for u in utts if u.split is not None})
    by_lower = {s.lower(): s for s in available}
    wanted = set()
    for s in splits:
        if s.lower() not in by_lower:
            raise CorpusError(
                f"--split {s}: not a split of {source}; available splits: {', '.join(available) or 'none'}"
            )
        wanted.add(by_lower[s.lower()])
    return [u for u in utts if u.split in wanted]
