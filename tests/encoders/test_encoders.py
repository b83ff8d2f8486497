"""Each encoder kind against the stock transformers model run the plain way, one utterance at a time."""

import math

import numpy as np
import pytest
import torch

from ser_cache.encoders import EncoderError, detect_kind, load_encoder, masked_pool
from ser_cache.encoders.whisper import WINDOW_POSITIONS, WINDOW_SAMPLES
from ser_cache.features.store_ref import default_store_name

from factories import tone


def waves():
    return [tone(2.3, seed=1), tone(7.1, freq=180, seed=2), tone(0.6, freq=300, seed=3),
            tone(16.0, seed=4)[:WINDOW_SAMPLES]]


def test_detect_kind(models):
    assert detect_kind(str(models["whisper"])) == "whisper"
    assert detect_kind(str(models["wavlm"])) == "wavlm"
    assert detect_kind(str(models["xvector"])) == "xvector"
    assert detect_kind(str(models["text"])) == "text"
    assert detect_kind("whisper-large-v3") == "whisper"  # short names need no files


def test_default_store_names():
    assert default_store_name("roberta-large") == "roberta-large"
    assert default_store_name("openai/whisper-large-v3") == "whisper-large-v3"
    assert default_store_name("/some/dir/my-model/") == "my-model"
    # A frame store never takes the pooled store's place in the same folder.
    assert default_store_name("whisper-large-v3", "frames") == "whisper-large-v3-frames"
    assert default_store_name("/some/dir/my-model/", "frames") == "my-model-frames"
    assert default_store_name("wavlm-large", "mean+std") == "wavlm-large"


@pytest.mark.slow
def test_whisper_15s_window_equals_stock_encoder_with_750_positions(models):
    """Our window == transformers' WhisperEncoder built for 750 positions, given the first 750 table rows."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    enc = load_encoder(str(models["whisper"]), device="cpu", precision="fp32")
    ours = enc.encode(waves()).numpy()

    full = WhisperForConditionalGeneration.from_pretrained(models["whisper"]).model.encoder
    config = WhisperConfig.from_pretrained(models["whisper"])
    config.max_source_positions = WINDOW_POSITIONS
    stock = WhisperEncoder(config).eval()
    state = full.state_dict()
    state["embed_positions.weight"] = state["embed_positions.weight"][:WINDOW_POSITIONS]
    stock.load_state_dict(state)
    fe = WhisperFeatureExtractor(feature_size=config.num_mel_bins, chunk_length=15)
    ref = []
    for w in waves():
        feats = fe(w, sampling_rate=16_000, return_tensors="pt").input_features
        assert feats.shape[-1] == 1500
        with torch.no_grad():
            h = stock(feats).last_hidden_state[0]
        valid = math.ceil(len(w) / 320)
        ref.append(h[:valid].mean(0).numpy())
    np.testing.assert_allclose(ours, np.stack(ref), rtol=1e-4, atol=1e-4)


def test_whisper_trimmed_is_batch_independent_and_close_to_window(models):
    trimmed = load_encoder(str(models["whisper"]), device="cpu", precision="fp32", window="trimmed")
    ws = waves()
    together = trimmed.encode(ws).numpy()
    alone = np.stack([trimmed.encode([w]).numpy()[0] for w in ws])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    window = load_encoder(str(models["whisper"]), device="cpu", precision="fp32").encode(ws).numpy()
    cos = (window * together).sum(1) / np.linalg.norm(window, axis=1) / np.linalg.norm(together, axis=1)
    assert np.all(cos > 0.9)  # close, but not the same computation:
    assert not np.allclose(window, together, atol=1e-4)


def test_whisper_window_refuses_longer_crop(models):
    with pytest.raises(EncoderError, match="--window trimmed"):
        load_encoder(str(models["whisper"]), device="cpu", max_seconds=20)


def test_wavlm_all_layers_equal_stock_model_one_at_a_time(models):
    from transformers import WavLMModel

    enc = load_encoder(str(models["wavlm"]), device="cpu", precision="fp32", pooling="mean+std")
    ws = waves()[:3]
    ours = enc.encode(ws).numpy()
    stock = WavLMModel.from_pretrained(models["wavlm"]).eval()
    assert ours.shape == (3, stock.config.num_hidden_layers + 1, 2 * stock.config.hidden_size)
    for i, w in enumerate(ws):
        x = torch.from_numpy((w - w.mean()) / np.sqrt(w.var() + 1e-7))[None]
        with torch.no_grad():
            out = stock(x, output_hidden_states=True)
        # As transformers 4.x returned them (and the challenge winner trained on): the last state is
        # the encoder's output after its final layer norm, i.e. last_hidden_state.
        hs = (*out.hidden_states[:-1], out.last_hidden_state)
        assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state)
        ref = np.stack([torch.cat([h[0].mean(0), h[0].std(0, unbiased=False)]).numpy() for h in hs])
        np.testing.assert_allclose(ours[i], ref, rtol=1e-3, atol=2e-4)


def test_xvector_equals_stock_model(models):
    from transformers import WavLMForXVector

    enc = load_encoder(str(models["xvector"]), device="cpu", precision="fp32")
    ws = waves()[:2]
    ours = enc.encode([ws[0]]).numpy()[0]
    stock = WavLMForXVector.from_pretrained(models["xvector"]).eval()
    with torch.no_grad():
        ref = stock(torch.from_numpy(ws[0])[None]).embeddings[0].numpy()
    assert ours.shape == (24,)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_text_masked_mean_equals_unpadded_mean(models):
    from transformers import AutoModel, AutoTokenizer

    enc = load_encoder(str(models["text"]), device="cpu", precision="fp32")
    d = enc.describe()
    assert d["input"] == "text" and d["hidden_size"] == enc.hidden and d["layers"] == [d["n_states"] - 1]
    texts = ["a short one", "a considerably longer sentence about a wonderful happy day at the sea"]
    ours = enc.encode(texts).numpy()
    tok = AutoTokenizer.from_pretrained(models["text"])
    model = AutoModel.from_pretrained(models["text"]).eval()
    for i, t in enumerate(texts):
        with torch.no_grad():
            h = model(**tok(t, return_tensors="pt")).last_hidden_state[0]
        np.testing.assert_allclose(ours[i], h.mean(0).numpy(), rtol=1e-4, atol=1e-5)


def test_masked_pool_against_numpy():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 6, 3)).astype(np.float32)
    out = masked_pool(torch.from_numpy(h), torch.tensor([4, 6]), "mean+std").numpy()
    for b, n in enumerate([4, 6]):
        np.testing.assert_allclose(out[b, :3], h[b, :n].mean(0), atol=1e-6)
        np.testing.assert_allclose(out[b, 3:], h[b, :n].std(0), atol=1e-6)


def test_unreachable_model_gives_one_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderError) as e:
        load_encoder("whisper-large-v3", device="cpu")
    msg = str(e.value)
    assert "whisper-large-v3" in msg and "openai/whisper-large-v3" in msg and "--model DIR" in msg
    with pytest.raises(EncoderError, match="no-such-org/no-such-model"):
        load_encoder("no-such-org/no-such-model", kind="text", device="cpu")


def test_checkpoint_missing_encoder_weights_is_refused(tmp_path, models):
    """A directory whose weights do not fit the encoder must not silently run on random weights."""
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=50)).save_pretrained(tmp_path / "bert")
    cfg = (models["whisper"] / "config.json").read_text()
    (tmp_path / "bert" / "config.json").write_text(cfg)  # claims to be Whisper, holds BERT weights
    with pytest.raises(EncoderError, match="lacks .* weight"):
        load_encoder(str(tmp_path / "bert"), device="cpu")


def test_unreachable_hub_fails_fast_with_the_same_message(monkeypatch):
    """Without the offline flag and with no route to the hub: one message at once, no minute of retries."""
    import time

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)  # either keeps the hub from being tried
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    t = time.perf_counter()
    with pytest.raises(EncoderError) as e:
        load_encoder("some-org/some-model", kind="text", device="cpu")
    assert time.perf_counter() - t < 10
    assert "some-org/some-model" in str(e.value) and "no connection to 127.0.0.1:9" in str(e.value)
    assert "--model DIR" in str(e.value)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.slow
def test_sdpa_wavlm_attention_equals_the_stock_layers_in_outputs_and_gradients(models):
    """The attention use_sdpa_attention swaps in computes what transformers' WavLM attention does:
    every hidden state and every weight gradient, on a padded batch with its attention mask."""
    from transformers import WavLMModel

    from ser_cache.encoders.wavlm import _sdpa_self_attention, use_sdpa_attention

    stock = WavLMModel.from_pretrained(models["wavlm"]).eval()
    ours = WavLMModel.from_pretrained(models["wavlm"]).eval()
    assert use_sdpa_attention(ours) == ours.config.num_hidden_layers
    ws = waves()[:3]
    lengths = torch.tensor([len(w) for w in ws])
    x = torch.zeros(3, int(lengths.max()))
    for i, w in enumerate(ws):
        x[i, : len(w)] = torch.from_numpy(w)
    mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
    results = []
    for model in (stock, ours):
        model.zero_grad()
        states = model(x, attention_mask=mask, output_hidden_states=True).hidden_states
        frames = model._get_feat_extract_output_lengths(lengths)
        # Only real frames: padded ones hold whatever attention over nothing gives.
        loss = sum((h[i, :f] ** 2).mean() for h in states for i, f in enumerate(frames.tolist()))
        loss.backward()
        results.append((torch.stack([torch.cat([h[i, :f].mean(0) for i, f in enumerate(frames.tolist())])
                                     for h in states]).detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-3, atol=1e-5, msg=name)
    # Both frozen WavLM encoders use it.
    for kind in ("wavlm", "xvector"):
        model = load_encoder(str(models[kind]), device="cpu").model
        wavlm = getattr(model, "wavlm", model)
        attn = wavlm.encoder.layers[0].attention.torch_multi_head_self_attention
        assert attn.__func__ is _sdpa_self_attention, kind
