"""The inputs placed on the training device (TrainingData.place) and the loop that uses them.

Placed batches must be the very tensors the numpy path gives, a run must not depend on where its
inputs were held, and inputs that do not fit must stay on the host and say so in config.json. The
CUDA tests at the end (pinned batches, no wait for the GPU within an epoch) are skipped without one.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from ser_cache.infra import runtime
from ser_cache.runs import layout
from ser_cache.system import inputs as inputs_mod, rows as rows_mod, scoring, setup
from ser_cache.system.rows import HOST, HOST_PINNED, ON_DEVICE, STREAMED, load_rows
from ser_cache.train import options, recipe
from ser_cache.train.fit import infer_stack
from ser_cache.train.stack import stack_of

from synthetic import make_corpus, make_frame_corpus, make_frame_store, make_store, read_csv, train

CPU = torch.device("cpu")
TIMING = ("seconds", "eval_seconds")


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory):
    """A corpus whose stores hold its utterances in another order, with some rows not written, so
    that the kept rows are neither the whole store nor in store order."""
    root = tmp_path_factory.mktemp("shuffled")
    manifest, ids, feats = make_corpus(root / "corpus", n=120)
    perm = np.random.default_rng(1).permutation(len(ids))
    written = np.ones(len(ids), dtype=bool)
    written[perm[:7]] = False
    stores = [make_store(root / "features" / f"{name}.zarr", [ids[i] for i in perm], x[perm],
                         kind="text" if name == "text" else "whisper", written=written,
                         modality="text" if name == "text" else "audio") for name, x in feats.items()]
    return manifest, stores


@pytest.fixture(scope="module")
def framed(tmp_path_factory):
    root = tmp_path_factory.mktemp("framed")
    manifest, ids, frames, text = make_frame_corpus(root / "corpus", n=90)
    stores = [make_frame_store(root / "features" / "audio-frames.zarr", ids, frames, chunk_rows=16),
              make_store(root / "features" / "text.zarr", ids, text, kind="text", modality="text")]
    return manifest, stores


def load(manifest, stores, **kw):
    return load_rows(manifest, "Train", "Development", stores, speaker_weight=0, frames=True, **kw)


def assert_same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        x, y = (value, b[name]) if isinstance(value, tuple) else ((value,), (b[name],))
        assert len(x) == len(y)
        for s, t in zip(x, y):
            assert s.dtype == t.dtype and s.shape == t.shape, name
            assert torch.equal(s.cpu(), t.cpu()), name


def some_rows(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.permutation(n)[:17], np.array([5, 0, 5, n - 1]), np.arange(n)]


# --------------------------------------------------------------------------- batches


def test_placed_pooled_batches_equal_the_numpy_path(shuffled):
    data = load(*shuffled)
    n = data.ids.size
    assert all(not np.array_equal(s.rows, np.arange(s.rows.size)) for s in data.inputs)  # a real mapping
    before = [data.batch(idx) for idx in some_rows(n)]
    where = data.place(CPU)
    assert where == {"audio": ON_DEVICE, "text": ON_DEVICE}
    assert data.memory["inputs"] == where and data.memory["device"] == "cpu"
    assert all(s.held is not None for s in data.inputs)
    for idx, reference in zip(some_rows(n), before):
        assert_same_batch(data.batch(idx), reference)  # a numpy index, as other callers give
        on_device = data.index(idx)
        assert on_device.dtype == torch.int64
        assert_same_batch(data.batch(on_device, idx), reference)
        assert_same_batch(data.batch(on_device), reference)  # no host copy given: read off the tensor


def test_placed_frame_batches_equal_the_numpy_path(framed):
    data = load(*framed)
    n = data.ids.size
    before = [data.batch(idx) for idx in some_rows(n)]
    assert data.place(CPU) == {"audio-frames": ON_DEVICE, "text": ON_DEVICE}
    frames = data.frame_inputs[0]
    assert frames.starts is not None and frames.host_lengths.shape == (n,)
    for idx, reference in zip(some_rows(n), before):
        assert_same_batch(data.batch(data.index(idx), idx), reference)
        assert_same_batch(data.batch(idx), reference)
        x, lengths = reference["audio-frames"]
        assert x.shape[1] == lengths.max()  # padded to the batch's longest row, not more


def test_pinned_host_batches_equal_the_numpy_path(shuffled, framed, monkeypatch):
    """The GPU fallback gathers into pinned memory; here pinning is a plain allocation, the gather the same."""
    allocated = []

    def pinned(shape, dtype):
        allocated.append(tuple(shape))
        return torch.empty(shape, dtype=dtype)

    monkeypatch.setattr(inputs_mod, "_pinned", pinned)
    for source in (shuffled, framed):
        data = load(*source)
        idx = some_rows(data.ids.size)[0]
        reference = data.batch(idx)
        for s in data.inputs:
            s.pin = True
        assert_same_batch(data.batch(idx), reference)
        assert_same_batch(data.batch(torch.from_numpy(idx), idx), reference)
    assert (idx.size, 24) in allocated and (idx.size, 16) in allocated and (idx.size,) in allocated


def test_inputs_that_do_not_fit_stay_on_the_host_largest_first(shuffled, framed, monkeypatch):
    data = load(*shuffled)
    audio, text = data.inputs
    assert audio.kept_bytes > text.kept_bytes
    idx = some_rows(data.ids.size)[0]
    reference = data.batch(idx)
    monkeypatch.setattr(rows_mod, "device_free_bytes", lambda device: audio.kept_bytes + text.kept_bytes - 1)
    # Both do not fit together: the larger goes on the device, the smaller stays on the host.
    assert data.place(CPU, share=1.0) == {"audio": ON_DEVICE, "text": HOST}
    assert audio.held is not None and text.held is None and not text.pin  # no pinning for a CPU device
    assert data.memory["device_inputs_gb"] == round(audio.kept_bytes / 1e9, 6)
    assert_same_batch(data.batch(data.index(idx), idx), reference)
    # Placed again with no room: what is held already stays (it takes nothing more), the rest stays out.
    assert data.place(CPU, share=0.0) == {"audio": ON_DEVICE, "text": HOST}
    assert data.memory["device_inputs_gb"] == 0

    data = load(*framed)
    reference = data.batch(idx[idx < data.ids.size])
    assert data.place(CPU, share=1e-12) == {"audio-frames": HOST, "text": HOST}
    assert data.frame_inputs[0].starts is None
    assert_same_batch(data.batch(idx[idx < data.ids.size]), reference)

    streamed = load(*framed, memory_budget_gb=1e-5)
    assert streamed.place(CPU) == {"audio-frames": STREAMED, "text": ON_DEVICE}


# --------------------------------------------------------------------------- the loop


def run_record(result) -> tuple:
    history = [{k: v for k, v in row.items() if k not in TIMING} for row in result.history]
    config = json.loads((result.run_dir / layout.CONFIG).read_text())
    return result.metrics, history, read_csv(result.run_dir / layout.DEV_PREDICTIONS), config["memory"]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["shuffled", "framed"])
def test_a_run_does_not_depend_on_where_its_inputs_are_held(tmp_path, source, request, monkeypatch):
    manifest, stores = request.getfixturevalue(source)
    options = {"epochs": 3, "undersample": True, "batch_size": 16}
    if source == "shuffled":
        options.update(speaker_weight=0.1, gender_weight=1.0)  # both auxiliary heads on
    else:
        options.update(speaker_weight=0, select="ccc")
    placed = run_record(train(tmp_path, manifest, stores, name="placed", **options)[0])
    monkeypatch.setattr(rows_mod, "DEVICE_SHARE", 0.0)  # nothing fits: every input on the host
    host = run_record(train(tmp_path, manifest, stores, name="host", **options)[0])
    assert set(placed[3]["inputs"].values()) == {ON_DEVICE}
    assert set(host[3]["inputs"].values()) == {HOST} and host[3]["device_share"] == 0.0
    assert placed[:3] == host[:3]  # metrics, history and Development predictions, exactly


def test_an_epoch_is_one_index_on_the_device_cut_as_before(tmp_path, shuffled, monkeypatch):
    """Batches are slices of one int64 tensor per epoch, at np.array_split's boundaries of the drawn
    order (as before the device path), and the targets are indexed on the device."""
    from ser_cache.system.rows import TrainingData
    from ser_cache.system.sampling import EpochSampler

    manifest, stores = shuffled
    calls: list[tuple] = []
    batch = TrainingData.batch

    def spy(self, idx, host_idx=None):
        calls.append((idx, None if host_idx is None else np.array(host_idx)))
        return batch(self, idx, host_idx)

    monkeypatch.setattr(TrainingData, "batch", spy)
    epochs, batch_size = 2, 16
    result, cfg = train(tmp_path, manifest, stores, epochs=epochs, batch_size=batch_size, undersample=True)
    data = recipe.load_training_data(cfg)
    train_idx, dev_idx = setup.select_rows(cfg, data)
    sampler = EpochSampler(data.emotions[train_idx], undersample=True, seed=cfg.seed)
    per_epoch = -(-len(sampler) // batch_size)
    scoring_steps = -(-dev_idx.size // scoring.EVAL_BATCH)
    assert len(calls) == epochs * (per_epoch + scoring_steps)
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        order = train_idx[sampler.epoch_indices()]
        steps = calls[(epoch - 1) * (per_epoch + scoring_steps):][:per_epoch]
        for (idx, host), expected in zip(steps, np.array_split(order, per_epoch)):
            assert torch.is_tensor(idx) and idx.dtype == torch.int64
            np.testing.assert_array_equal(host, expected)
            np.testing.assert_array_equal(idx.numpy(), expected)
        storage = {idx.untyped_storage().data_ptr() for idx, _ in steps}
        assert len(storage) == 1  # every batch a view of the epoch's one index tensor
    assert result.metrics["ccc"]["mean"] > 0


def reference_infer(model, fetch, n: int, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """`infer` as it was before the device path: each batch's predictions copied to the host at once."""
    model.eval()
    avd = np.empty((n, 3), dtype=np.float64)
    probs = np.empty((n, model.n_genders), dtype=np.float64) if model.n_genders else None
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n))
            out = model(runtime.to_device(fetch(idx), CPU))
            avd[idx] = out["avd"].double().cpu().numpy()
            if probs is not None:
                probs[idx] = torch.softmax(out["gender_logits"].double(), dim=-1).cpu().numpy()
    return avd, probs


@pytest.mark.parametrize("genders", [2, 0])
def test_infer_over_placed_rows_equals_the_batch_by_batch_copy(shuffled, genders):
    from ser_cache.system.heads import MultitaskHeads
    from ser_cache.system.model import FeatureModel

    data = load(*shuffled)
    torch.manual_seed(0)
    model = FeatureModel(MultitaskHeads({s.name: s.shape for s in data.inputs}, hidden=8, label_min=[1.0] * 3,
                                        label_max=[7.0] * 3, n_genders=genders))
    rows = np.random.default_rng(3).permutation(data.ids.size)
    # Batches of 7 rows, and the loop's scoring (fit.infer_stack) in one batch of all (a batch's size
    # can change the last bits).
    small = reference_infer(model, lambda idx: data.batch(rows[idx]), rows.size, batch_size=7)
    whole = reference_infer(model, lambda idx: data.batch(rows[idx]), rows.size, batch_size=scoring.EVAL_BATCH)
    data.place(CPU)
    got = scoring.infer(model, lambda idx: data.batch(rows[idx]), rows.size, device=CPU, batch_size=7)
    pred, probs = infer_stack(stack_of([model], [None]), data, rows, CPU)
    by_rows = (pred[0], None if probs is None else probs[0])
    for result, expected in ((got, small), (by_rows, whole)):
        np.testing.assert_array_equal(result[0], expected[0])
        if genders:
            np.testing.assert_array_equal(result[1], expected[1])
            assert result[1].flags.c_contiguous
        else:
            assert result[1] is None
        assert result[0].shape == (rows.size, 3) and result[0].flags.c_contiguous
    empty = scoring.infer(model, lambda idx: data.batch(rows[idx]), 0, device=CPU)
    assert empty[0].shape == (0, 3)


# --------------------------------------------------------------------------- CUDA only (skipped here)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_placed_and_pinned_host_batches_equal_the_numpy_path(shuffled, framed):
    device = torch.device("cuda")
    for source in (shuffled, framed):
        reference_data = load(*source)
        idx = some_rows(reference_data.ids.size)[0]
        reference = reference_data.batch(idx)
        placed, host = load(*source), load(*source)
        assert set(placed.place(device).values()) == {ON_DEVICE}
        assert set(host.place(device, share=0.0).values()) == {HOST_PINNED}
        on_placed = placed.batch(placed.index(idx), idx)
        assert all((v[0] if isinstance(v, tuple) else v).is_cuda for v in on_placed.values())
        assert_same_batch(on_placed, reference)
        on_host = host.batch(host.index(idx), idx)
        assert all((v[0] if isinstance(v, tuple) else v).is_pinned() for v in on_host.values())
        assert_same_batch(on_host, reference)


@cuda
def test_cuda_epochs_and_scoring_do_not_wait_for_the_gpu(framed, tmp_path, monkeypatch):
    """Within an epoch nothing reads a value back: torch's sync debug mode reports each wait. An extra
    epoch may add two (its loss sums, at the end, and its scoring's predictions); a wait in a step
    would add one per step (dozens here). Gender and speaker heads as the data has them: the losses
    have no branch on the data."""
    from ser_cache.train import fit

    device = torch.device("cuda")
    monkeypatch.setattr(fit, "write_job", lambda job, best, history: None)  # writing the run reads back

    def waits(epochs: int) -> int:
        data = load(*framed)
        data.place(device)
        cfg = options.TrainHeadsConfig(features=(), data=framed[0], out=tmp_path / "unused", batch_size=8,
                                        epochs=epochs, conv_dim=8, hidden=8, device="cuda", progress=False)
        run = setup.set_up(cfg, data, device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fit.fit([fit.Job(cfg, data, run)], device, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    waits(1)  # warm-up (kernels, allocator)
    one, three = waits(1), waits(3)
    assert three - one <= 2 * 2, (one, three)
