"""Stage two: train multitask heads on cached features, in minutes.

The loop, in order:
1. read the corpus and every input store into memory, join them by utterance id, and drop rows
   that cannot be used (labels missing, features not written), counting each reason (rows.py);
   frame stores are read for the kept rows only, or streamed when they do not fit the budget;
2. pick the training rows and the Development evaluation rows for the chosen O/X variant
   (paper Table 5), and derive what the heads need from the training rows only: the label
   range (Eq. 2), the gender classes, the speaker classes;
3. build the model (model.FeatureModel): a ConvPool per frame store, its pooled vector
   concatenated with the pooled stores, the heads on top; with pooled stores only, the heads
   (steps 2-3 are `set_up`, which every sweep member goes through too);
4. each epoch: draw a fresh (optionally undersampled) order, step through it in batches with
   L = sum(1 - CCC) + alpha CE(gender) + beta AAM(speaker) (Eq. 1), then score Development;
5. keep the epoch with the best mean (balanced) CCC and write the run directory in one rename.
Steps 4-5 are fit.py's loop, the one loop of heads on a cache: train-heads gives it one job, a
sweep (sweep.py) K jobs trained together. This module keeps the options, the set-up and the
helpers the loop, finetune, predict and evaluate share.

Why no DataLoader: the features already sit in memory as float16 arrays, so a batch is one
gather per store (from the packed frames for a frame store). Worker processes would only copy
those arrays around. Streamed frames change only which rows are in memory when:
`TrainingData.in_blocks` hands the loop the epoch's rows block by block, and with everything in
memory it is one block, the order as drawn.

On the device (`TrainingData.place`, once): the inputs that fit are held on the training device
as tensors of the kept rows, the others in host memory (batches gathered into pinned memory on a
GPU); the targets are tensors on the device from the start. Each epoch's drawn order (each
block's, when frames are streamed) goes to the device as one int64 tensor and a batch is a slice
of it, so a step copies nothing to the device for inputs held there and never waits for it: the
loss terms are summed on the device and read once an epoch, and Development predictions stay on
the device until the pass is over (one copy back per evaluation).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ser_cache import __version__

from ser_cache.runs import rundir
from ser_cache.system.metrics import ATTRIBUTES as AVD  # the heads' "avd" column order, too
from ser_cache.system.rows import (  # noqa: F401  (re-exported: finetune, predict and tests import them from here)
    NO_EMOTION_CLASS,
    SPEAKER_EMBEDDING_KIND,
    FrameInput,
    InputStore,
    TrainError,
    TrainingData,
    default_memory_budget_gb,
    index_tensor,
    label_index,
    load_rows,
    store_record,
)

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

SELECT_MODES = ("balanced", "ccc")
EVAL_BATCH = 4096  # rows per forward pass when scoring; memory, not accuracy, decides it
# With frame inputs: 64 rows × up to 750 Whisper frames × 1280 is 245 MB of float32 per pass.
EVAL_FRAME_BATCH = 64
BLOCK_ORDER = 1  # third word of the seed of the order in which streamed blocks are visited
PRECISIONS = ("auto", "fp32", "bf16")  # of the heads' matrix products; weights, loss and metrics stay fp32

@dataclass(frozen=True)
class TrainHeadsConfig:
    """Everything `train-heads` needs; defaults follow the paper where it says, documented where it does not.

    batch_size: the paper does not give it; 64 keeps per-step overhead low on CPU while an
    undersampled MSP-Podcast epoch (~12k rows) still gets ~190 updates.
    weight_decay: AdamW's own default (0.01); the paper names AdamW and nothing more.
    threads: CPU threads for torch while training; 0 or None: torch's default (all cores). 1 by
    default, from benchmarks/threads_bench.py (docs/performance.md): on a busy 2-core machine two
    threads made pooled heads 4.7x slower and frame heads 1.3x slower, while on the same machine
    idle they made a full MSP-Podcast-scale run 1.45x faster; threads that wait for each other
    lose far more on a shared machine than a second thread gains on an idle one.
    dropout: of the heads; 0, as the authors' heads (Linear–ReLU–Linear, no dropout). It was 0.1
    before frame inputs came; the option stays, for older runs' setting and for experiments.
    conv_dim, conv_dropout: the ConvPool of every frame store, the authors' 256 and 0.1.
    memory_budget_gb: memory for the inputs (pooled stores whole, frame stores' kept rows packed);
    frames that do not fit are streamed in blocks. None: half the physical memory.
    precision: of the matrix products (heads and ConvPools), see `compute_dtype`; auto is bf16
    where the hardware does bf16 fast (`bf16_fast`), fp32 elsewhere.
    """

    features: tuple[Path, ...]
    data: Path
    out: Path
    train_split: str = "Train"
    dev_split: str = "Development"
    epochs: int = 50
    lr: float = 5e-5
    batch_size: int = 64
    weight_decay: float = 0.01
    seed: int = 0
    undersample: bool = True
    ox: str = "keep"
    gender_weight: float = 1.0
    speaker_weight: float = 0.1
    aam_margin: float = 0.2
    aam_scale: float = 30.0
    select: str = "balanced"
    balanced_trials: int = 10
    balanced_per_class: int | None = None
    hidden: int = 256
    dropout: float = 0.0
    conv_dim: int = 256
    conv_dropout: float = 0.1
    memory_budget_gb: float | None = None
    tensorboard: Path | None = None  # a folder for TensorBoard scalars (the history rows)
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = 1
    overwrite: bool = False
    progress: bool = True

    def verify(self) -> None:
        """Raise one TrainError listing every problem with the options."""
        problems = []
        if not self.features:
            problems.append("--features: give at least one feature store")
        if len(set(map(str, self.features))) != len(self.features):
            problems.append("--features: the same store is given twice")
        if not self.lr > 0:
            problems.append(f"--lr {self.lr}: expected a positive learning rate")
        if self.batch_size < 2:
            problems.append(f"--batch-size {self.batch_size}: expected 2 or more (CCC needs two rows)")
        if self.conv_dim < 1:
            problems.append(f"--conv-dim {self.conv_dim}: expected 1 or more")
        if not 0 <= self.conv_dropout < 1:
            problems.append(f"--conv-dropout {self.conv_dropout}: expected a probability in [0, 1)")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            problems.append(f"--memory-budget {self.memory_budget_gb}: expected a positive number of GB")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision {self.precision}: expected one of {', '.join(PRECISIONS)}")
        problems += common_problems(self)
        if problems:
            raise TrainError("; ".join(problems))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["features"] = [str(p) for p in self.features]
        d["data"] = str(self.data)
        d["out"] = str(self.out)
        d["tensorboard"] = None if self.tensorboard is None else str(self.tensorboard)
        return d


def common_problems(cfg) -> list[str]:
    """Problems with the options every training loop shares (heads, loss, sampling, selection).

    `cfg` is a TrainHeadsConfig or a FinetuneConfig: both carry these fields under these names.
    """
    from ser_cache.system.sampling import OX_MODES

    problems = []
    if cfg.epochs < 1:
        problems.append(f"--epochs {cfg.epochs}: expected 1 or more")
    if cfg.weight_decay < 0:
        problems.append(f"--weight-decay {cfg.weight_decay}: expected 0 or more")
    if cfg.ox not in OX_MODES:
        problems.append(f"--ox {cfg.ox}: expected one of {', '.join(OX_MODES)}")
    if cfg.gender_weight < 0:
        problems.append(f"--gender-weight {cfg.gender_weight}: expected 0 (head off) or more")
    if cfg.speaker_weight < 0:
        problems.append(f"--speaker-weight {cfg.speaker_weight}: expected 0 (head off) or more")
    if not 0 <= cfg.aam_margin < math.pi / 2:
        problems.append(f"--aam-margin {cfg.aam_margin}: expected radians in [0, pi/2)")
    if not cfg.aam_scale > 0:
        problems.append(f"--aam-scale {cfg.aam_scale}: expected a positive scale")
    if cfg.select not in SELECT_MODES:
        problems.append(f"--select {cfg.select}: expected one of {', '.join(SELECT_MODES)}")
    if cfg.balanced_trials < 1:
        problems.append(f"--balanced-trials {cfg.balanced_trials}: expected 1 or more")
    if cfg.balanced_per_class is not None and cfg.balanced_per_class < 1:
        problems.append(f"--balanced-per-class {cfg.balanced_per_class}: expected 1 or more")
    if cfg.hidden < 1:
        problems.append(f"--hidden {cfg.hidden}: expected 1 or more")
    if not 0 <= cfg.dropout < 1:
        problems.append(f"--dropout {cfg.dropout}: expected a probability in [0, 1)")
    if cfg.threads is not None and cfg.threads < 0:
        problems.append(f"--threads {cfg.threads}: expected 1 or more, or 0 for torch's default (all cores)")
    if cfg.train_split == cfg.dev_split:
        problems.append(f"--train-split and --dev-split are both {cfg.train_split}")
    return problems


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    metrics: dict
    wall_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- data


def load_training_data(cfg: TrainHeadsConfig) -> TrainingData:
    """Read corpus and stores, join them, drop unusable rows (counting why); frames within the budget."""
    return load_rows(cfg.data, cfg.train_split, cfg.dev_split, cfg.features, speaker_weight=cfg.speaker_weight,
                     frames=True, memory_budget_gb=cfg.memory_budget_gb)


# --------------------------------------------------------------------------- inference


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TrainError(f"--device {device}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev


def bf16_fast(device) -> bool:
    """Whether `device` multiplies bf16 matrices natively: a CUDA GPU with bf16, or a CPU with AMX or
    AVX512-BF16. Elsewhere bf16 is emulated, slower than fp32, so `--precision auto` keeps fp32."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    capability = torch.backends.cpu.get_cpu_capability().upper()  # "AVX512" says nothing about bf16
    if "AMX" in capability or "BF16" in capability:
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def compute_dtype(precision: str, device):
    """The dtype of the matrix products for --precision on `device`: torch.bfloat16, or None for fp32."""
    import torch

    if precision == "fp32" or (precision == "auto" and not bf16_fast(device)):
        return None
    if precision not in ("auto", "bf16"):
        raise TrainError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainError(f"--precision bf16: {device} does not support bfloat16; use --precision fp32")
    return torch.bfloat16


def to_device(batch: Mapping, device) -> dict:
    """A batch dict on `device`: tensors, and the (frames, lengths) pairs of frame inputs."""
    return {k: tuple(t.to(device, non_blocking=True) for t in v) if isinstance(v, tuple)
            else v.to(device, non_blocking=True) for k, v in batch.items()}


def eval_batch_size(model) -> int:
    """Rows per forward pass when scoring: memory decides it, and frames take far more than vectors."""
    return EVAL_FRAME_BATCH if getattr(model, "frame_names", ()) else EVAL_BATCH


def infer(model, fetch, n: int, *, device, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Run a trained model (FeatureModel or bare heads) over rows 0..n-1; `fetch(idx)` gives the
    inputs of rows `idx` (a contiguous ascending range, as a numpy array: tensors, and (frames,
    lengths) for frame inputs).

    The predictions stay on `device` until the last batch and come back in one copy: no batch waits
    for the one before it to reach the host.
    Returns (avd (n, 3) float64, gender probabilities (n, G) or None).
    """
    import torch

    batch_size = batch_size or eval_batch_size(model)
    was_training = model.training
    model.eval()
    genders = model.n_genders
    parts = []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n))
            out = model(to_device(fetch(idx), device))
            cols = [out["avd"].double()]
            if genders:
                cols.append(torch.softmax(out["gender_logits"].double(), dim=-1))
            parts.append(torch.cat(cols, dim=1))
        table = torch.cat(parts).cpu().numpy() if parts else np.empty((0, 3 + genders), dtype=np.float64)
    model.train(was_training)
    avd = np.ascontiguousarray(table[:, :3])
    return avd, (np.ascontiguousarray(table[:, 3:]) if genders else None)


def score(avd_pred: np.ndarray, avd_true: np.ndarray, emotions: Sequence[str], *,
          gender_pred: np.ndarray | None = None, gender_true: np.ndarray | None = None,
          balanced_trials: int = 10, balanced_per_class: int | None = None, seed: int = 0) -> dict:
    """CCC table, balanced CCC (None when no primary emotion is present) and gender accuracy/macro-F1."""
    from ser_cache.system import metrics

    result = {"rows": len(avd_true), "ccc": metrics.ccc_table(avd_pred, avd_true)}
    if np.isin(np.asarray(emotions, dtype=object), metrics.PRIMARY_EMOTIONS).any():
        result["balanced_ccc"] = metrics.balanced_ccc(avd_pred, avd_true, emotions, per_class=balanced_per_class,
                                                      n_trials=balanced_trials, seed=seed)
    else:
        result["balanced_ccc"] = None
    if gender_pred is not None and gender_true is not None:
        result["gender"] = metrics.gender_metrics(gender_pred, gender_true)
    return result


# --------------------------------------------------------------------------- the loop


def train_heads(cfg: TrainHeadsConfig) -> TrainResult:
    """Train the heads as configured and write the run directory; returns where, and the kept epoch."""
    cfg.verify()
    rundir.check_run_target(cfg.out, cfg.overwrite)  # refuse before minutes of loading, not after
    if cfg.tensorboard is not None and tensorboard_problem():
        raise TrainError(tensorboard_problem())
    with torch_threads(cfg.threads):
        return _train_heads(cfg)


def _train_heads(cfg: TrainHeadsConfig) -> TrainResult:
    import torch

    from ser_cache.train.fit import Diverged, Job, fit
    from ser_cache.system.sampling import EpochSampler

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    data = load_training_data(cfg)
    data.place(device)
    run = set_up(cfg, data, device)
    per_epoch = len(EpochSampler(data.emotions[run.train_idx], undersample=cfg.undersample, seed=cfg.seed))
    log.info("training on %d rows (%d per epoch%s), validating on %d %s rows; inputs: %s; %s on %s",
             run.train_idx.size, per_epoch, ", undersampled" if cfg.undersample else "", run.dev_idx.size,
             data.dev_split, ", ".join(f"{s.name} {s.shape}" for s in data.inputs),
             str(run.model.compute_dtype or torch.float32).removeprefix("torch."), device)
    # The one loop (fit.py) with one job: what a sweep does with K.
    (done,) = fit([Job(cfg, data, run, title=Path(cfg.out).name, overwrite=cfg.overwrite)], device,
                  progress=cfg.progress)
    if isinstance(done, Diverged):
        raise TrainError(done.message())
    wall = time.perf_counter() - t0
    log.info("kept epoch %d of %d (%s %s CCC %.4f) in %.1f s; run written to %s", done.best_epoch, cfg.epochs,
             data.dev_split, "balanced" if cfg.select == "balanced" else "mean", done.score, wall, cfg.out)
    return TrainResult(run_dir=Path(cfg.out), best_epoch=done.best_epoch, metrics=done.metrics, wall_seconds=wall,
                       history=done.history)


def run_config(train: dict, data: TrainingData, lo: Sequence[float], hi: Sequence[float], gender_labels: list[str],
               speaker_labels: list[str], heads_config: dict, best_epoch: int, **extra) -> dict:
    """config.json of a run: the training options, every cached input, labels, and the heads' arguments.

    `extra` adds fields of other run kinds (a fine-tuned encoder's `system` and architecture) and
    "frame_inputs", the ConvPool arguments of every frame store (model.FeatureModel.config()).
    The options' paths are recorded absolute, and "provenance" says what trained the run on which
    labels (provenance.py).
    """
    from ser_cache.runs import provenance

    return {
        "format": rundir.RUN_FORMAT,
        "format_version": rundir.format_version(extra.get("frame_inputs")),
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
        "provenance": provenance.record(train.get("data")),
        "train": provenance.absolute_paths(train),
        "inputs": [s.record() for s in data.inputs],
        "excluded_stores": data.excluded_stores,
        "labels": {"attributes": list(AVD), "min": list(lo), "max": list(hi)},
        "gender_labels": gender_labels,
        "n_speakers": len(speaker_labels),
        "speakers": speaker_labels,
        "heads": heads_config,
        "data": data.counts,
        "best_epoch": best_epoch,
    }


def write_run_files(directory: Path, config: dict, metrics: dict, history: list[dict], dev_ids: list[str],
                    pred: np.ndarray, probs: np.ndarray | None, gender_labels: list[str]) -> None:
    """Everything of a run directory but the weights: metrics, history, Development predictions, config last."""
    directory = Path(directory)
    rundir.write_json_atomic(directory / rundir.METRICS, metrics)
    rundir.write_csv_atomic(directory / rundir.HISTORY, list(history[0]), [list(r.values()) for r in history])
    rundir.write_predictions(directory / rundir.DEV_PREDICTIONS, dev_ids, pred, gender_labels=gender_labels or None,
                           gender_probs=probs)
    # config.json makes the directory a finished run (rundir.is_run_dir), so it comes last.
    rundir.write_json_atomic(directory / rundir.CONFIG, config)


def batch_loss(out: dict, target: dict, aam, *, gender_weight: float, speaker_weight: float,
               tensors: bool = False):
    """Paper Eq. 1 on one batch of head outputs: (total loss, its unweighted parts).

    `target` holds "avd" (B, 3), "gender" (B,) and "speaker" (B,) on the outputs' device. The parts
    are floats, or with `tensors` detached scalar tensors on that device (no wait for a GPU).
    """
    from ser_cache.system.losses import multitask_loss, multitask_loss_terms

    speaker_loss = aam(out["speaker_embedding"], target["speaker"]) if aam is not None else None
    with_gender = "gender_logits" in out
    return (multitask_loss_terms if tensors else multitask_loss)(out["avd"], target["avd"],
                          gender_logits=out["gender_logits"] if with_gender else None,
                          gender_target=target["gender"] if with_gender else None,
                          gender_weight=gender_weight, speaker_loss=speaker_loss, speaker_weight=speaker_weight)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with n torch threads, then give back the number there was (it is process-wide).
    n None or 0: torch's own number, unchanged."""
    import torch

    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def batch_bounds(n: int, batch_size: int) -> list[int]:
    """Where an epoch's (or a streamed block's) n rows are cut into batches: about `batch_size` rows
    each and equal-sized (np.array_split's cuts), never fewer than two rows a batch where n allows."""
    n_batches = max(1, min(-(-n // batch_size), n // 2))
    q, r = divmod(n, n_batches)
    return np.cumsum([0] + [q + 1] * r + [q] * (n_batches - r)).tolist()


@dataclass
class RunSetup:
    """What a heads run derives before its first step: its rows, what the heads learn from the training
    rows only (label range, gender and speaker classes), and the seeded model and AAM-softmax."""

    train_idx: np.ndarray
    dev_idx: np.ndarray
    lo: list[float]
    hi: list[float]
    gender_labels: list[str]
    speaker_labels: list[str]
    genders: np.ndarray  # class index of every row's gender (-1: unknown or not a training class)
    speakers: np.ndarray
    model: object  # model.FeatureModel on the device, its compute dtype set
    aam: object  # losses.AAMSoftmax, or None without a speaker head


def set_up(cfg: TrainHeadsConfig, data: TrainingData, device) -> RunSetup:
    """The O/X variant's rows, the label range and classes from its training rows, and the model seeded
    with cfg.seed: the same for `train-heads` and for every member of a sweep."""
    import torch

    from ser_cache.system.heads import MultitaskHeads
    from ser_cache.system.losses import AAMSoftmax
    from ser_cache.system.model import FeatureModel

    train_idx, dev_idx = select_rows(cfg, data)
    check_selectable(cfg, data, dev_idx)
    # Everything the heads learn about labels comes from the training rows only.
    lo, hi = label_range(data.avd[train_idx])
    gender_labels = head_classes("gender", cfg.gender_weight, [data.genders[i] for i in train_idx])
    speaker_labels = head_classes("speaker", cfg.speaker_weight, [data.speakers[i] for i in train_idx])
    # A frame store reaches the heads as its ConvPool's (conv_dim,) vector. The heads are built
    # first, so that with pooled stores only the seeded initialisation is what it always was.
    pools = {s.name: {"in_dim": s.dim, "dim": cfg.conv_dim, "dropout": cfg.conv_dropout} for s in data.frame_inputs}
    torch.manual_seed(cfg.seed)
    heads = MultitaskHeads({s.name: (cfg.conv_dim,) if s.name in pools else s.shape for s in data.inputs},
                           hidden=cfg.hidden, dropout=cfg.dropout, label_min=lo, label_max=hi,
                           n_genders=len(gender_labels), n_speakers=len(speaker_labels),
                           aam_margin=cfg.aam_margin, aam_scale=cfg.aam_scale)
    model = FeatureModel(heads, pools).to(device)
    model.compute_dtype = compute_dtype(cfg.precision, device)
    aam = (AAMSoftmax(heads.speaker_embedding_dim, len(speaker_labels), margin=cfg.aam_margin,
                      scale=cfg.aam_scale).to(device) if speaker_labels else None)
    return RunSetup(train_idx, dev_idx, lo, hi, gender_labels, speaker_labels, label_index(data.genders, gender_labels),
                    label_index(data.speakers, speaker_labels), model, aam)


def label_range(avd: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-attribute min and max of the training labels: the heads' output range (paper Eq. 2)."""
    lo, hi = avd.min(axis=0).astype(float), avd.max(axis=0).astype(float)
    flat = [f"{a} ({l})" for a, l, h in zip(AVD, lo, hi) if not h > l]
    if flat:
        raise TrainError(f"every training label of {', '.join(flat)} is the same; the heads need a label range "
                         "(paper Eq. 2)")
    return lo.tolist(), hi.tolist()


def head_classes(head: str, weight: float, values: Sequence[str | None]) -> list[str]:
    """Sorted known classes of an auxiliary head; none when it is off or has fewer than two classes."""
    if weight == 0:
        return []
    classes = sorted({v for v in values if v is not None})
    if len(classes) < 2:
        log.warning("%s head off: the training rows have %d known %s value(s)", head, len(classes), head)
        return []
    return classes


def select_rows(cfg: TrainHeadsConfig, data: TrainingData) -> tuple[np.ndarray, np.ndarray]:
    """Training and Development-evaluation rows of the O/X variant; an empty side is an error."""
    from ser_cache.system.sampling import select_training

    train_idx, dev_idx = select_training(data.splits, data.emotions, cfg.ox, train_split=data.train_split,
                                         dev_split=data.dev_split)
    moved = int((data.splits[train_idx] != data.train_split).sum())
    if moved:
        log.info("--ox %s: %d O/X %s row(s) moved into training and out of the evaluation", cfg.ox, moved,
                 cfg.dev_split)
    data.counts["dev_rows_moved_to_train"] = moved
    if train_idx.size < 2:
        raise TrainError(f"--ox {cfg.ox}: {train_idx.size} training row(s) left; at least 2 are needed")
    if dev_idx.size < 2:
        raise TrainError(f"--ox {cfg.ox}: {dev_idx.size} {cfg.dev_split} row(s) left to evaluate; at least 2 are needed")
    return train_idx, dev_idx


def check_selectable(cfg: TrainHeadsConfig, data: TrainingData, dev_idx: np.ndarray) -> None:
    from ser_cache.system.metrics import PRIMARY_EMOTIONS

    if cfg.select == "balanced" and not np.isin(data.emotions[dev_idx], PRIMARY_EMOTIONS).any():
        raise TrainError(f"--select balanced needs {cfg.dev_split} rows with a primary emotion "
                         f"({' '.join(PRIMARY_EMOTIONS)}); none has one. Use --select ccc")


def fused_adamw_ok(device) -> bool:
    """Fused AdamW (one kernel for all parameters) is much cheaper per step on CPU and CUDA alike."""
    import torch

    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1, device=device))], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def history_row(epoch: int, losses: Mapping[str, float], dev: dict, seconds: float, eval_seconds: float) -> dict:
    row = {"epoch": epoch, "seconds": round(seconds, 3), "eval_seconds": round(eval_seconds, 3)}
    row.update({f"loss_{k}": v for k, v in losses.items()})
    row.update({f"dev_ccc_{k}": v for k, v in dev["ccc"].items()})
    b = dev.get("balanced_ccc") or {}
    row.update({f"dev_balanced_ccc_{k}": b.get(k, float("nan")) for k in (*AVD, "mean")})
    g = dev.get("gender") or {}
    row.update({"dev_gender_accuracy": g.get("accuracy", float("nan")),
                "dev_gender_macro_f1": g.get("macro_f1", float("nan"))})
    return row


TENSORBOARD_MISSING = ("--tensorboard: needs the tensorboard package, which is not installed; "
                       "pip install 'ser-cache[tensorboard]'")


def tensorboard_problem() -> str | None:
    """None when torch's SummaryWriter can be used, else the one-line reason."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return TENSORBOARD_MISSING
    return None


class TensorBoardLog:
    """History rows as TensorBoard scalars in a folder: one per history.csv column, at its epoch."""

    def __init__(self, folder: Path) -> None:
        problem = tensorboard_problem()
        if problem:
            raise TrainError(problem)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(folder))

    def log(self, epoch: int, row: dict) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, epoch)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class EpochProgress:
    """A rich progress bar over epochs showing the loss and the Development scores.

    With `tensorboard` (a folder), every history row is also logged there as TensorBoard scalars,
    one per history.csv column, at its epoch.
    """

    WIDE_COLUMNS = 110  # narrower consoles get the short line: it fits 80 columns

    def __init__(self, enabled: bool, epochs: int, *, tensorboard: Path | None = None, console=None):
        self.enabled = enabled
        self.epochs = epochs
        self.tensorboard = tensorboard
        self.console = console
        self._progress = None
        self._writer = None
        self._wide = True

    def make_progress(self):
        import sys

        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = self.console or Console(file=sys.stderr)
        self._wide = console.width >= self.WIDE_COLUMNS
        if self._wide:
            columns = (TextColumn("[bold]epochs"), BarColumn(), MofNCompleteColumn())
        else:
            columns = (BarColumn(bar_width=10), TextColumn("epoch"), MofNCompleteColumn())
        progress = Progress(*columns, TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
        self._task = progress.add_task("train", total=self.epochs, info="")
        return progress

    def __enter__(self) -> Self:
        if self.tensorboard is not None:
            self._writer = TensorBoardLog(self.tensorboard)
        if self.enabled:
            self._progress = self.make_progress()
            self._progress.start()
        return self

    def info(self, row: dict, best_epoch: int) -> str:
        loss, ccc, balanced = row["loss_total"], row["dev_ccc_mean"], row["dev_balanced_ccc_mean"]
        if self._wide:
            return f"loss {loss:.3f} · dev CCC {ccc:.3f} · balanced {balanced:.3f} · best epoch {best_epoch}"
        return f"loss {loss:.3f} CCC {ccc:.3f} bal {balanced:.3f} best {best_epoch}"

    def update(self, epoch: int, row: dict, best_epoch: int) -> None:
        if self._writer is not None:
            self._writer.log(epoch, row)
        if self._progress is not None:
            self._progress.update(self._task, completed=epoch, info=self.info(row, best_epoch))

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._writer is not None:
            self._writer.close()
