"""Matrix-product peaks, FLOP counts and utilisation for the train-heads benchmark.

`benchmarks/train_heads_bench.py --compare` trains the heads in fp32 and in bf16 in one process and
puts each run's rate against the matrix-product rate of its dtype measured in the same process.
The pieces live here so that they can be tested:

- `matmul_tflops`: the best rate of one product shape in one dtype, after warm-up;
- `peak_shapes`: the shapes worth measuring for a model: 2048³, and the heads' fused first layer
  (rows × in_dim × sum of first-layer widths) at the training and at the evaluation batch;
- `products`, `forward_flops`, `train_flops`, `executed_train_flops`: FLOPs counted from the
  model's Linear and Conv1d layers;
- `compare`, `format_table`: the fp32/bf16 comparison and its table.

What is counted: 2·k·n FLOPs per row for every Linear(k, n) (a 1×1 Conv1d: per valid frame), the
multiply-adds of the matrix products only. Bias additions, activations, the loss, the optimizer, and
a LayerWeighting's mix of layers are not counted (all small next to the products). Training counts
3 × forward (forward, weight gradient, input gradient: the usual convention); `executed_train_flops`
leaves out the input gradient where backward does not compute it (a layer fed by the data itself,
e.g. the heads' first layers on pooled stores), so it is what the hardware actually multiplies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ser_cache.infra.runtime import HEADS_PRECISIONS

__all__ = ["Product", "compare", "executed_train_flops", "format_table", "forward_flops", "matmul_tflops",
           "peak_shapes", "products", "train_flops", "utilisation"]

SQUARE = 2048  # the dense reference product, n³


@dataclass(frozen=True)
class Product:
    """One matrix product of a model's forward pass: (rows·per_row, k) × (k, n).

    per_row: how many times it runs per row (1 for a Linear, the valid frames for a 1×1 Conv1d);
    input_grad: whether backward computes its input's gradient (False where the input is data).
    """

    name: str
    k: int
    n: int
    per_row: float = 1.0
    input_grad: bool = True

    @property
    def forward_flops_per_row(self) -> float:
        return 2.0 * self.k * self.n * self.per_row


def _heads_of(model):
    """(heads, pools): the MultitaskHeads and the ConvPools of a FeatureModel, or of bare heads."""
    heads = getattr(model, "heads", model)
    return heads, list(getattr(model, "pools", ()))


def first_layers(heads) -> list:
    """The heads' first Linear layers, in the order the forward pass fuses them."""
    return [mlp[0] for mlp in heads.mlps().values()]


def products(model, frames_per_row: Mapping[str, float] | float | None = None) -> list[Product]:
    """Every nn.Linear and nn.Conv1d of `model` (a FeatureModel or MultitaskHeads) as a `Product`.

    frames_per_row: valid frames per row of each frame input (by its name, or one number for all);
    a ConvPool's convolutions run once per frame. Needed only when the model has frame inputs.
    """
    from torch import nn

    heads, pools = _heads_of(model)
    # The heads' first layers see the concatenated inputs: data, unless a LayerWeighting or a
    # ConvPool (parameters) made them, in which case backward needs their gradient too.
    first = {id(m) for m in first_layers(heads)} if hasattr(heads, "mlps") else set()
    heads_input_is_data = not getattr(heads, "_layered", ()) and not pools
    frames = {}
    for name, pool in zip(getattr(model, "frame_names", ()), pools):
        if frames_per_row is None:
            raise ValueError(f"frame input {name!r}: products need frames_per_row")
        f = frames_per_row if isinstance(frames_per_row, (int, float)) else frames_per_row[name]
        for j, m in enumerate(pool.convs):
            frames[id(m)] = (float(f), j == 0)  # the first convolution sees the frames: data
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out.append(Product(name, m.in_features, m.out_features,
                               input_grad=not (id(m) in first and heads_input_is_data)))
        elif isinstance(m, nn.Conv1d):
            per_row, data_fed = frames.get(id(m), (1.0, False))
            k = m.in_channels // m.groups * m.kernel_size[0]
            # A Conv1d's output length is the input's for a 1×1 kernel, as ConvPool's are.
            out.append(Product(name, k, m.out_channels, per_row=per_row, input_grad=not data_fed))
    return out


def forward_flops(prods: Iterable[Product], rows: float) -> float:
    """FLOPs of one forward pass over `rows` rows (evaluation)."""
    return float(rows) * sum(p.forward_flops_per_row for p in prods)


def train_flops(prods: Iterable[Product], rows: float) -> float:
    """FLOPs of training on `rows` rows by the convention forward + backward = 3 × forward."""
    return 3.0 * forward_flops(prods, rows)


def executed_train_flops(prods: Iterable[Product], rows: float) -> float:
    """FLOPs training on `rows` rows actually multiplies: forward, weight gradient, and the input
    gradient only where backward computes it (2× forward for a layer fed by data, else 3×)."""
    return float(rows) * sum(p.forward_flops_per_row * (3 if p.input_grad else 2) for p in prods)


def peak_shapes(model, train_batch: int, eval_batch: int, square: int = SQUARE) -> dict[str, tuple[int, int, int]]:
    """(m, k, n) of the products to measure: `square`³, the heads' fused first layer (rows × in_dim ×
    sum of first-layer widths) at the training and the evaluation batch, and one head's first layer
    at the training batch (what a CPU runs below heads.FUSE_MIN_ROWS_CPU rows)."""
    heads, _ = _heads_of(model)
    layers = first_layers(heads)
    in_dim = layers[0].in_features
    widths = [m.out_features for m in layers]
    return {"square": (square, square, square), "train_fused": (train_batch, in_dim, sum(widths)),
            "train_per_head": (train_batch, in_dim, max(widths)), "eval_fused": (eval_batch, in_dim, sum(widths))}


def matmul_tflops(m: int, k: int, n: int, dtype, device="cpu", *, trials: int = 5, min_seconds: float = 0.2,
                  warmup: int = 3) -> float:
    """Best rate (TFLOP/s) of F.linear on an (m, k) input and an (n, k) weight, both in `dtype`: the
    layout of the heads' products, 2·m·k·n FLOPs each. After `warmup` products, `trials` timings of
    as many products as take about `min_seconds`; the best, not the mean: a peak is what the hardware
    can do, and a mean would fold other processes' load into it. Runs on torch's current threads."""
    import torch
    from torch.nn import functional as F

    device = torch.device(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(n, k, generator=g).to(device=device, dtype=dtype)
    with torch.inference_mode():
        for _ in range(max(1, warmup)):
            F.linear(a, w)
        sync()
        t = time.perf_counter()
        F.linear(a, w)
        sync()
        one = max(time.perf_counter() - t, 1e-7)
        iters = max(1, math.ceil(min_seconds / one))
        best = 0.0
        for _ in range(max(1, trials)):
            t = time.perf_counter()
            for _ in range(iters):
                F.linear(a, w)
            sync()
            best = max(best, 2.0 * m * k * n * iters / (time.perf_counter() - t) / 1e12)
    return best


def utilisation(flops: float, seconds: float, peak_tflops: float) -> float:
    """Achieved rate (flops / seconds) as a share of a peak in TFLOP/s; nan when either is unknown."""
    if not seconds > 0 or not peak_tflops > 0:
        return float("nan")
    return flops / seconds / 1e12 / peak_tflops


PRECISIONS = tuple(p for p in HEADS_PRECISIONS if p != "auto")  # the heads' two precisions compared, fp32 first


def compare(runs: Mapping[str, Mapping], peaks: Mapping[str, Mapping[str, float]], flops: Mapping[str, float],
            ccc_target: float = 0.005) -> dict:
    """The fp32/bf16 comparison: per precision its rates and utilisations, and the ratios.

    runs[p]: "wall_s", "epoch_s", "train_s", "eval_s" (per epoch, medians), "mean_ccc", "peak_mb";
    peaks[p]: TFLOP/s by `peak_shapes` name; flops: "train" (3 × forward, per epoch), "executed"
    (per epoch) and "eval" (per epoch). Utilisation of training is against the peak of the same
    dtype at the fused training shape and at the square; of evaluation, at the fused evaluation shape.
    """
    out: dict = {"per_precision": {}}
    for p in PRECISIONS:
        r, pk = runs[p], peaks[p]
        out["per_precision"][p] = {
            "train_tflops": flops["train"] / r["train_s"] / 1e12 if r["train_s"] > 0 else float("nan"),
            "train_executed_tflops": flops["executed"] / r["train_s"] / 1e12 if r["train_s"] > 0 else float("nan"),
            "eval_tflops": flops["eval"] / r["eval_s"] / 1e12 if r["eval_s"] > 0 else float("nan"),
            "train_util_train_shape": utilisation(flops["train"], r["train_s"], pk["train_fused"]),
            "train_util_square": utilisation(flops["train"], r["train_s"], pk["square"]),
            "train_executed_util_train_shape": utilisation(flops["executed"], r["train_s"], pk["train_fused"]),
            "eval_util_eval_shape": utilisation(flops["eval"], r["eval_s"], pk["eval_fused"]),
            "eval_util_square": utilisation(flops["eval"], r["eval_s"], pk["square"]),
        }

    def speedup(key):
        return runs["fp32"][key] / runs["bf16"][key] if runs["bf16"][key] > 0 else float("nan")

    delta = runs["bf16"]["mean_ccc"] - runs["fp32"]["mean_ccc"]
    out["ratios"] = {
        "wall_speedup": speedup("wall_s"), "epoch_speedup": speedup("epoch_s"),
        "train_speedup": speedup("train_s"), "eval_speedup": speedup("eval_s"),
        **{f"peak_{name}": peaks["bf16"][name] / peaks["fp32"][name] if peaks["fp32"][name] > 0 else float("nan")
           for name in peaks["fp32"]},
    }
    out["ccc_delta"] = delta
    out["ccc_target"] = ccc_target
    out["ccc_target_met"] = bool(abs(delta) <= ccc_target)
    return out


def _shape(s: Sequence[int]) -> str:
    return "×".join(str(x) for x in s) if len(set(s)) > 1 else f"{s[0]}³"


def format_table(runs: Mapping[str, Mapping], peaks: Mapping[str, Mapping[str, float]],
                 shapes: Mapping[str, Sequence[int]], flops: Mapping[str, float], result: Mapping) -> str:
    """One plain-text table: rows are figures, columns fp32, bf16 and bf16 against fp32 (a speed-up
    fp32/bf16 for times, a ratio bf16/fp32 for rates, a difference for the CCC)."""
    pp = result["per_precision"]
    ratios = result["ratios"]
    rows: list[tuple[str, str, str, str]] = []

    def num(x, fmt):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    def pct(x):
        return "n/a" if math.isnan(x) else f"{100 * x:.1f} %"

    labels = {"square": "matmul peak", "train_fused": "matmul peak, train fused",
              "train_per_head": "matmul peak, train per head", "eval_fused": "matmul peak, eval fused"}
    for name, label in labels.items():
        if name in peaks["fp32"]:
            rows.append((f"{label} {_shape(shapes[name])} (TFLOP/s)", num(peaks["fp32"][name], ".3f"),
                         num(peaks["bf16"][name], ".3f"), f"{num(ratios['peak_' + name], '.2f')} ratio"))
    for key, label in (("wall_s", "train_heads wall (s)"), ("epoch_s", "per epoch, median (s)"),
                       ("train_s", "  of it training (s)"), ("eval_s", "  of it Dev scoring (s)")):
        short = key.removesuffix("_s")
        rows.append((label, num(runs["fp32"][key], ".3f"), num(runs["bf16"][key], ".3f"),
                     f"{num(ratios[f'{short}_speedup'], '.2f')}× speed-up"))
    rows.append(("train GFLOP/epoch, 3 × forward", num(flops["train"] / 1e9, ".2f"), "same", ""))
    rows.append(("  executed (no input grad on data)", num(flops["executed"] / 1e9, ".2f"), "same", ""))
    rows.append(("Dev scoring GFLOP/epoch", num(flops["eval"] / 1e9, ".2f"), "same", ""))
    square = _shape(shapes["square"])
    for key, label in (("train_tflops", "achieved train TFLOP/s (3 × fwd)"),
                       ("train_util_train_shape", "  utilisation vs train fused peak"),
                       ("train_util_square", f"  utilisation vs {square} peak"),
                       ("train_executed_util_train_shape", "  same, executed FLOPs only"),
                       ("eval_tflops", "achieved Dev scoring TFLOP/s"),
                       ("eval_util_eval_shape", "  utilisation vs eval fused peak"),
                       ("eval_util_square", f"  utilisation vs {square} peak")):
        a, b = pp["fp32"][key], pp["bf16"][key]
        if key.endswith("tflops"):
            rows.append((label, num(a, ".4f"), num(b, ".4f"), f"{num(b / a if a > 0 else float('nan'), '.2f')} ratio"))
        else:
            rows.append((label, pct(a), pct(b), ""))
    rows.append(("peak memory (MB)", num(runs["fp32"].get("peak_mb"), ".0f"), num(runs["bf16"].get("peak_mb"), ".0f"),
                 ""))
    delta = result["ccc_delta"]
    rows.append(("Dev mean CCC (kept epoch)", num(runs["fp32"]["mean_ccc"], ".4f"),
                 num(runs["bf16"]["mean_ccc"], ".4f"),
                 f"Δ {delta:+.4f} (|Δ| ≤ {result['ccc_target']}: {'met' if result['ccc_target_met'] else 'missed'})"))
    head = ("", "fp32", "bf16", "bf16 vs fp32")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(4)]
    lines = [f"{head[0]:<{widths[0]}}  {head[1]:>{widths[1]}}  {head[2]:>{widths[2]}}  {head[3]}"]
    lines.append("-" * len(lines[0]))
    lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}  {d}".rstrip() for a, b, c, d in rows]
    return "\n".join(lines)
