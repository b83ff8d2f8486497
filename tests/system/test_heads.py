import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ser_cache.system.heads import LayerPick, LayerWeighting, MultitaskHeads, RegressionHead

LABEL_MIN = [1.0, 1.5, 1.2]
LABEL_MAX = [7.0, 6.5, 6.8]


def make_heads(**overrides) -> MultitaskHeads:
    kwargs = dict(
        hidden=16,
        dropout=0.1,
        label_min=LABEL_MIN,
        label_max=LABEL_MAX,
        n_genders=2,
        n_speakers=10,
        speaker_embedding_dim=8,
    )
    kwargs.update(overrides)
    input_dims = kwargs.pop("input_dims", {"whisper-large-v3": (4, 6), "roberta.large": (5,)})
    return MultitaskHeads(input_dims, **kwargs)


def make_inputs(batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "whisper-large-v3": torch.randn(batch, 4, 6, generator=g),
        "roberta.large": torch.randn(batch, 5, generator=g),
    }


def test_layer_weighting_starts_as_plain_mean():
    x = torch.randn(2, 5, 7)
    lw = LayerWeighting(5)
    torch.testing.assert_close(lw(x), x.mean(dim=1))
    torch.testing.assert_close(lw.weights, torch.full((5,), 0.2))


def test_layer_weighting_receives_gradients():
    lw = LayerWeighting(3)
    x = torch.randn(4, 3, 2)
    x[:, 0] += 5.0  # layers differ, so the weights matter
    lw(x).sum().backward()
    assert lw.logits.grad is not None and lw.logits.grad.abs().sum() > 0


def test_layer_pick_is_that_layer_bit_for_bit_and_under_vmap_each_members_own():
    x = torch.randn(5, 4, 6) * 1e3
    x[:, 1] = -0.0  # signed zeros elsewhere change nothing
    assert torch.equal(LayerPick(4, 2)(x), x[:, 2])
    onehots = torch.stack([LayerPick(4, k).onehot for k in (0, 3)])
    picked = torch.vmap(lambda h: (x * h[:, None]).sum(1))(onehots)
    assert torch.equal(picked[0], x[:, 0]) and torch.equal(picked[1], x[:, 3])
    with pytest.raises(ValueError, match="outside"):
        LayerPick(4, 4)


def test_picked_heads_are_heads_on_that_layer_alone(tmp_path):
    torch.manual_seed(0)
    picked = make_heads(layer_picks={"whisper-large-v3": 1})
    torch.manual_seed(0)
    alone = make_heads(input_dims={"whisper-large-v3": (6,), "roberta.large": (5,)})
    assert picked.state_dict().keys() == alone.state_dict().keys()  # the pick is no weight
    assert all(torch.equal(v, alone.state_dict()[k]) for k, v in picked.state_dict().items())
    assert picked.layer_weights() == {} and picked.config()["layer_picks"] == {"whisper-large-v3": 1}
    assert "layer_picks" not in make_heads().config()
    x = make_inputs()
    picked.eval(), alone.eval()
    same = alone({"whisper-large-v3": x["whisper-large-v3"][:, 1], "roberta.large": x["roberta.large"]})
    assert torch.equal(picked(x)["avd"], same["avd"])
    again = MultitaskHeads.from_config(json.loads(json.dumps(picked.config())))
    again.load_state_dict(picked.state_dict())
    again.eval()
    assert torch.equal(again(x)["avd"], same["avd"])
    with pytest.raises(ValueError, match="not an input of shape"):
        make_heads(layer_picks={"roberta.large": 0})


def test_regression_head_stays_in_label_range():
    torch.manual_seed(0)
    head = RegressionHead(4, hidden=8, lo=1.3, hi=6.7).eval()
    x = torch.cat([torch.randn(64, 4), torch.randn(64, 4) * 1e6, torch.full((2, 4), -1e30)])
    y = head(x)
    assert y.shape == (130,)
    assert torch.all(y >= 1.3 - 1e-6) and torch.all(y <= 6.7 + 1e-6)
    assert torch.all(y >= head.lo) and torch.all(y <= head.hi)
    # Eq. 2 on ordinary inputs.
    z = head.mlp(x[:64]).squeeze(-1)
    torch.testing.assert_close(y[:64], 1.3 + (6.7 - 1.3) * torch.sigmoid(z))


def test_regression_head_range_in_state_dict():
    head = RegressionHead(4, hidden=8, lo=2.0, hi=5.0)
    other = RegressionHead(4, hidden=8, lo=0.0, hi=1.0)
    other.load_state_dict(head.state_dict())
    assert other.lo.item() == 2.0 and other.hi.item() == 5.0
    x = torch.randn(5, 4)
    torch.testing.assert_close(other.eval()(x), head.eval()(x))


def test_regression_head_rejects_empty_range():
    with pytest.raises(ValueError):
        RegressionHead(4, lo=3.0, hi=3.0)


def test_multitask_output_shapes_and_aam_attributes():
    heads = make_heads()
    out = heads(make_inputs(batch=3))
    assert out["avd"].shape == (3, 3)
    assert out["gender_logits"].shape == (3, 2)
    assert out["speaker_embedding"].shape == (3, 8)
    assert heads.in_dim == 6 + 5
    assert (heads.speaker_embedding_dim, heads.n_speakers) == (8, 10)
    assert (heads.aam_margin, heads.aam_scale) == (0.2, 30.0)
    for col, (lo, hi) in enumerate(zip(LABEL_MIN, LABEL_MAX)):
        assert torch.all((out["avd"][:, col] >= lo) & (out["avd"][:, col] <= hi))


def test_multitask_without_auxiliary_heads():
    out = make_heads(n_genders=0, n_speakers=0)(make_inputs())
    assert set(out) == {"avd"}


def test_multitask_input_order_is_sorted_by_name():
    torch.manual_seed(0)
    a = make_heads(input_dims={"b-enc": (3,), "a-enc": (2, 4)}).eval()
    b = make_heads(input_dims={"a-enc": (2, 4), "b-enc": (3,)}).eval()
    b.load_state_dict(a.state_dict())
    inputs = {"b-enc": torch.randn(2, 3), "a-enc": torch.randn(2, 2, 4)}
    reordered = {"a-enc": inputs["a-enc"], "b-enc": inputs["b-enc"]}
    out_a, out_b = a(inputs), b(reordered)
    for key in out_a:
        torch.testing.assert_close(out_a[key], out_b[key])
    assert a.config() == b.config()


def test_multitask_config_and_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    heads = make_heads()
    # Move weights off their initial values so a load that silently failed would show.
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    (tmp_path / "config.json").write_text(json.dumps(heads.config()))
    save_file(heads.state_dict(), tmp_path / "weights.safetensors")

    torch.manual_seed(2)
    rebuilt = MultitaskHeads.from_config(json.loads((tmp_path / "config.json").read_text()))
    rebuilt.load_state_dict(load_file(tmp_path / "weights.safetensors"))
    inputs = make_inputs(batch=4, seed=5)
    expected, got = heads.eval()(inputs), rebuilt.eval()(inputs)
    assert set(expected) == set(got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_multitask_missing_input_names_it():
    inputs = make_inputs()
    del inputs["roberta.large"]
    with pytest.raises(KeyError, match="roberta.large"):
        make_heads()(inputs)


@pytest.mark.parametrize(
    ("name", "tensor"),
    [
        ("whisper-large-v3", torch.randn(3, 5, 6)),
        ("roberta.large", torch.randn(3, 4)),
        ("roberta.large", torch.randn(3, 1, 5)),
    ],
)
def test_multitask_wrong_shape_names_it(name, tensor):
    inputs = make_inputs()
    inputs[name] = tensor
    with pytest.raises(ValueError, match=name):
        make_heads()(inputs)


def test_multitask_accepts_half_precision_cache():
    heads = make_heads().eval()
    inputs = make_inputs()
    half = {k: v.half() for k, v in inputs.items()}
    torch.testing.assert_close(heads(half)["avd"], heads(inputs)["avd"], atol=1e-2, rtol=0)


@pytest.mark.slow
def test_multitask_learns_a_synthetic_regression():
    torch.manual_seed(0)
    n = 256
    layered = torch.randn(n, 3, 4)
    flat = torch.randn(n, 5)
    # Targets inside the label range that depend on both inputs.
    signal = torch.tanh(layered[:, 1, :3] + flat[:, :3])
    lo, hi = torch.tensor(LABEL_MIN), torch.tensor(LABEL_MAX)
    target = lo + (hi - lo) * (signal + 1) / 2
    heads = MultitaskHeads(
        {"enc": (3, 4), "text": (5,)},
        hidden=32,
        dropout=0.0,
        label_min=LABEL_MIN,
        label_max=LABEL_MAX,
    )
    optimizer = torch.optim.Adam(heads.parameters(), lr=1e-2)
    inputs = {"enc": layered, "text": flat}

    def loss() -> torch.Tensor:
        return torch.nn.functional.mse_loss(heads(inputs)["avd"], target)

    initial = loss().item()
    for _ in range(60):
        optimizer.zero_grad()
        step_loss = loss()
        step_loss.backward()
        optimizer.step()
    assert loss().item() < 0.5 * initial


# --------------------------------------------------------------------------- the fused first layers


def per_head_forward(heads: MultitaskHeads, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The heads as five separate MLPs, each its own first-layer product: what the fused forward replaces."""
    x = heads._pooled(inputs)
    out = {"avd": torch.stack([heads.regressors[a](x) for a in ("arousal", "valence", "dominance")], dim=-1)}
    if heads.gender is not None:
        out["gender_logits"] = heads.gender(x)
    if heads.speaker is not None:
        out["speaker_embedding"] = heads.speaker(x)
    return out


@pytest.fixture(params=["fused", "per head"])
def fuse_min_rows(request, monkeypatch):
    """Both ways of running the first layers, whatever the batch size (fused at any size, or never)."""
    from ser_cache.system import heads

    monkeypatch.setattr(heads, "FUSE_MIN_ROWS_CPU", 0 if request.param == "fused" else 10**9)
    return request.param


@pytest.mark.parametrize("aux", [{}, {"n_genders": 0}, {"n_speakers": 0}, {"n_genders": 0, "n_speakers": 0}])
def test_fused_first_layers_equal_the_per_head_forward(aux, fuse_min_rows):
    torch.manual_seed(0)
    heads = make_heads(**aux).eval()
    inputs = make_inputs(batch=32)
    with torch.no_grad():
        fused, plain = heads(inputs), per_head_forward(heads, inputs)
    assert fused.keys() == plain.keys()
    for key in fused:  # the same numbers up to the order of float summation
        torch.testing.assert_close(fused[key], plain[key], rtol=0, atol=1e-6)


def test_fused_forward_draws_the_same_dropout_and_gradients(fuse_min_rows):
    torch.manual_seed(0)
    heads = make_heads(dropout=0.3).train()
    inputs = make_inputs(batch=16)
    torch.manual_seed(5)
    fused = heads(inputs)
    torch.manual_seed(5)
    plain = per_head_forward(heads, inputs)
    for key in fused:
        torch.testing.assert_close(fused[key], plain[key], rtol=0, atol=1e-6)
    grads = []
    for out in (fused, plain):
        heads.zero_grad()
        sum(v.sum() for v in out.values()).backward()
        grads.append({n: p.grad.clone() for n, p in heads.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_parameters_stay_per_head():
    # Existing runs' weights load: the fusion happens at forward time, the state dict is per head.
    keys = set(make_heads().state_dict())
    for head in ("regressors.arousal.mlp", "regressors.valence.mlp", "regressors.dominance.mlp", "gender",
                 "speaker"):
        assert {f"{head}.0.weight", f"{head}.0.bias", f"{head}.3.weight", f"{head}.3.bias"} <= keys


def test_bf16_compute_keeps_float32_outputs_near_fp32(fuse_min_rows):
    torch.manual_seed(0)
    heads = make_heads().eval()
    inputs = make_inputs(batch=64)
    with torch.no_grad():
        fp32, bf16 = heads(inputs), heads(inputs, compute_dtype=torch.bfloat16)
    for key in fp32:
        assert bf16[key].dtype == torch.float32
        torch.testing.assert_close(bf16[key], fp32[key], rtol=0.05, atol=0.05)
    assert not torch.equal(bf16["avd"], fp32["avd"])  # bf16 did run
    assert ((bf16["avd"] >= torch.tensor(LABEL_MIN)) & (bf16["avd"] <= torch.tensor(LABEL_MAX))).all()


# --------------------------------------------------------------------------- the class head (categorical task)


def test_an_attribute_heads_config_and_state_dict_have_nothing_of_a_class_head():
    kw = dict(hidden=16, label_min=[1, 1, 1], label_max=[7, 7, 7], n_genders=2)
    heads = MultitaskHeads({"a": (8,)}, **kw)
    assert "n_classes" not in heads.config() and "attributes" not in heads.config()
    assert not any(k.startswith("classifier") for k in heads.state_dict())
    assert set(heads({"a": torch.randn(3, 8)})) == {"avd", "gender_logits"}


@pytest.mark.parametrize("rows", [4, 300])  # per head, and the fused first layers (FUSE_MIN_ROWS_CPU)
def test_class_heads_beside_or_instead_of_the_attribute_heads(rows):
    kw = dict(hidden=16, label_min=[1, 1, 1], label_max=[7, 7, 7], n_genders=2)
    both = MultitaskHeads({"a": (8,), "b": (3, 5)}, n_classes=9, **kw)
    x = {"a": torch.randn(rows, 8), "b": torch.randn(rows, 3, 5)}
    out = both(x)
    assert out["class_logits"].shape == (rows, 9) and out["avd"].shape == (rows, 3)
    # The class head has the attribute heads' shape: Linear(in, hidden), ReLU, Dropout, Linear(hidden, C).
    assert [type(m).__name__ for m in both.classifier] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert both.classifier[0].weight.shape == (16, 13) and both.classifier[3].weight.shape == (9, 16)
    alone = MultitaskHeads({"a": (8,), "b": (3, 5)}, n_classes=8, attributes=False, **kw)
    assert not any(k.startswith("regressors") for k in alone.state_dict())
    out = alone(x)
    assert set(out) == {"class_logits", "gender_logits"} and out["class_logits"].shape == (rows, 8)
    again = MultitaskHeads.from_config(alone.config())
    assert alone.config()["attributes"] is False and alone.config()["n_classes"] == 8
    again.load_state_dict(alone.state_dict())
    alone.eval(), again.eval()
    assert torch.equal(again(x)["class_logits"], alone(x)["class_logits"])
    with pytest.raises(ValueError, match="class head"):
        MultitaskHeads({"a": (8,)}, attributes=False, **kw)


def test_a_class_head_leaves_the_seeded_attribute_heads_as_they_were():
    kw = dict(hidden=16, label_min=[1, 1, 1], label_max=[7, 7, 7], n_genders=2, n_speakers=3)
    torch.manual_seed(0)
    plain = MultitaskHeads({"a": (8,)}, **kw).state_dict()
    torch.manual_seed(0)
    with_class = MultitaskHeads({"a": (8,)}, n_classes=8, **kw).state_dict()
    assert all(torch.equal(plain[k], with_class[k]) for k in plain)
