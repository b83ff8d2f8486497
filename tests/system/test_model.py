"""system.model.FeatureModel with a frame input of several hidden states: a LayerWeighting at every
frame, then the ConvPool, against a re-statement; its weights exposed and its config read back."""

from __future__ import annotations

import pytest
import torch

from ser_cache.system.heads import MultitaskHeads
from ser_cache.system.model import WEIGHTED_LAYERS, FeatureModel

B, T, L, D = 3, 7, 4, 6


def model(layered: bool = True) -> FeatureModel:
    torch.manual_seed(0)
    heads = MultitaskHeads({"frames": (8,), "text": (5,), "wavlm": (3, 5)}, hidden=16, label_min=[1, 1, 1],
                           label_max=[7, 7, 7])
    pool = {"in_dim": D, "dim": 8, "layers": 2, "dropout": 0.1, **({WEIGHTED_LAYERS: L} if layered else {})}
    return FeatureModel(heads, {"frames": pool}).eval()


def inputs(frames: torch.Tensor) -> dict:
    torch.manual_seed(1)
    lengths = torch.tensor([7, 2, 5])
    return {"frames": (frames, lengths), "text": torch.randn(B, 5).half(), "wavlm": torch.randn(B, 3, 5).half()}


def test_layered_frames_are_weighted_at_every_frame_then_pooled():
    m = model()
    with torch.no_grad():
        m.frame_weightings[0].logits.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    frames = torch.randn(B, T, L, D).half()
    x = inputs(frames)
    with torch.no_grad():
        got = m(x)["avd"]
        # The re-statement: softmax weights over the L states, the weighted sum of each frame's states
        # (float32), then the model's own ConvPool and heads on it.
        w = torch.softmax(torch.tensor([0.5, -1.0, 2.0, 0.0]), 0)
        mixed = (frames.float() * w[None, None, :, None]).sum(2)
        want = m.heads({"frames": m.pools[0](mixed, x["frames"][1]), "text": x["text"].float(),
                        "wavlm": x["wavlm"].float()})["avd"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    weights = m.layer_weights()
    assert set(weights) == {"frames", "wavlm"}  # the frame input's beside the pooled store's
    torch.testing.assert_close(weights["frames"], w)


def test_frame_weights_learn_and_the_config_reads_back():
    m = model().train()
    out = m(inputs(torch.randn(B, T, L, D).half()))["avd"].sum()
    out.backward()
    assert m.frame_weightings[0].logits.grad is not None and m.frame_weightings[0].logits.grad.abs().sum() > 0
    config = m.config()
    assert config["frames"] == {"in_dim": D, "dim": 8, "layers": 2, "dropout": 0.1, WEIGHTED_LAYERS: L}
    again = FeatureModel.from_config(m.heads.config(), config)
    assert again.state_dict().keys() == m.state_dict().keys()
    assert "frame_weightings.0.logits" in m.state_dict()


def test_frames_of_one_state_keep_the_model_as_it_was():
    m = model(layered=False)
    assert not any(k.startswith("frame_weightings") for k in m.state_dict())
    assert WEIGHTED_LAYERS not in m.config()["frames"] and set(m.layer_weights()) == {"wavlm"}
    with torch.no_grad():
        assert m(inputs(torch.randn(B, T, D).half()))["avd"].shape == (B, 3)


def test_frames_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"expected frames \(B, T, 4, 6\)"):
        model()(inputs(torch.randn(B, T, L + 1, D).half()))
