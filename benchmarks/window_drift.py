"""How far Whisper features from `--window trimmed` drift from the 15-s window, per utterance.

    python benchmarks/window_drift.py --model whisper-large-v3 --data /data/MSP-Podcast --split Development --limit 2000

Encodes the same utterances both ways with `ser_cache.features.encode.compute_features` (the code path of
`extract`) and reports the cosine similarity and relative L2 distance between the two pooled vectors
(median, 5th percentile, worst), overall and by duration bucket. With --random-init the full-size
architecture is built from the shipped config with random weights (a stand-in when the real weights
are not available; real weights are what matter for the figure users care about).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="whisper-large-v3")
    ap.add_argument("--random-init", action="store_true", help="full-size architecture, random weights")
    ap.add_argument("--data", type=Path, help="corpus (MSP-Podcast layout or manifest); default: synthetic audio")
    ap.add_argument("--split", action="append")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from ser_cache.data.corpus import load_corpus
    from ser_cache.encoders import load_encoder
    from ser_cache.features.bench import build_random_model, shipped_config, synthetic_durations, write_corpus
    from ser_cache.features.encode import compute_features

    tmp = tempfile.TemporaryDirectory()
    model = args.model
    if args.random_init:
        build_random_model(shipped_config(args.model), Path(tmp.name) / "model")
        model = str(Path(tmp.name) / "model")
    data = args.data
    if data is None:
        data = write_corpus(Path(tmp.name) / "corpus", synthetic_durations(args.limit, 0), 0)
    utts = load_corpus(data, args.split)[: args.limit]
    feats = {}
    for window in ("window", "trimmed"):
        enc = load_encoder(model, kind="whisper", window=window, device=args.device, precision=args.precision)
        feats[window], errors = compute_features(enc, utts, workers=0, device=args.device)
    ok = np.array([u.id not in errors for u in utts])
    a = feats["window"][ok].astype(np.float64)
    b = feats["trimmed"][ok].astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    from ser_cache.data import audio

    secs = np.array([min(audio.info(u.path).seconds, 15.0) for u, k in zip(utts, ok) if k])

    def summary(mask):
        return {"n": int(mask.sum()), "cosine_median": float(np.median(cos[mask])),
                "cosine_p5": float(np.percentile(cos[mask], 5)), "cosine_min": float(cos[mask].min()),
                "rel_l2_median": float(np.median(rel[mask])), "rel_l2_max": float(rel[mask].max())}

    report = {"model": args.model, "random_init": args.random_init, "all": summary(np.ones(len(cos), bool))}
    for lo, hi in [(0, 3), (3, 6), (6, 10), (10, 15.01)]:
        m = (secs >= lo) & (secs < hi)
        if m.any():
            report[f"{lo}-{int(hi)} s"] = summary(m)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
