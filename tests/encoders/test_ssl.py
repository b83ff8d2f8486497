"""The SSL encoder (WavLM, HuBERT, wav2vec 2.0, data2vec-audio, W2V-BERT) and Whisper, layer by layer:
each stored state against transformers' own hidden_states for the input the family's own feature
extractor prepares; --layers subsets against the all-layers output; the settings of the default
stores pinned to what they were before --layers existed."""

import numpy as np
import pytest
import torch

from ser_cache.encoders import EncoderError, load_encoder

from factories import tone

SR = 16_000


def clips():
    """Three short clips of unlike level and offset: a normalisation left out or added shows."""
    return [tone(0.6, seed=1) * 0.3 + 0.02, tone(0.35, freq=180, seed=2) * 2.0, tone(0.5, freq=300, seed=3) - 0.05]


def assert_close_vectors(ours, ref, rel=1e-3):
    """Each vector (last axis) within `rel` of its reference, relative to the reference's norm (the
    float16 a store keeps holds about 3 significant digits)."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape
    err = np.linalg.norm(ours - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-12)
    assert err.max() < rel, err


def test_default_settings_are_todays(models):
    """The settings (and so the fingerprints) of the stores built before --layers: the keys and values
    the encoders on main (b7ac124) wrote, for WavLM pooled and frames and Whisper's four."""
    wavlm = load_encoder(str(models["wavlm"]), device="cpu")
    common = {"kind": "wavlm", "model_id": str(models["wavlm"].resolve()), "revision": wavlm.revision,
              "max_seconds": 15.0, "sample_rate": SR, "normalize": True, "attention_mask": True}
    assert wavlm.settings() == {**common, "pooling": "mean", "layer": "all", "last_state": "after-final-layer-norm"}
    frames = load_encoder(str(models["wavlm"]), device="cpu", pooling="frames")
    assert frames.settings() == {**common, "pooling": "frames", "layer": "last",
                                 "last_state": "after-final-layer-norm"}
    assert wavlm.revision.startswith("sha256:")
    for window in ("window", "trimmed"):
        for pooling in ("mean", "frames"):
            enc = load_encoder(str(models["whisper"]), device="cpu", window=window, pooling=pooling)
            assert enc.settings() == {"kind": "whisper", "model_id": str(models["whisper"].resolve()),
                                      "revision": enc.revision, "window": window, "pooling": pooling,
                                      "max_seconds": 15.0, "sample_rate": SR, "layer": "last"}
    # Naming the default explicitly is the same store.
    assert load_encoder(str(models["wavlm"]), device="cpu", layers="0-2").settings() == wavlm.settings()
    assert load_encoder(str(models["whisper"]), device="cpu", layers="2").settings()["layer"] == "last"


def test_wavlm_layer_subsets_are_slices_of_all(models):
    every = load_encoder(str(models["wavlm"]), device="cpu", precision="fp32")
    ws = clips()
    full = every.encode(ws).numpy()
    assert full.shape == (3, 3, 32)
    for spec, idx in (("0,2", [0, 2]), ("1", 1), ("last", 2)):
        enc = load_encoder(str(models["wavlm"]), device="cpu", precision="fp32", layers=spec)
        got = enc.encode(ws).numpy()
        np.testing.assert_allclose(got, full[:, idx], rtol=1e-5, atol=1e-6)
        assert enc.feature_shape == got.shape[1:]
        assert enc.describe()["layers"] == (idx if isinstance(idx, list) else [idx])
    assert load_encoder(str(models["wavlm"]), device="cpu", layers="0,2").settings()["layer"] == [0, 2]
    assert load_encoder(str(models["wavlm"]), device="cpu", layers="1").settings()["layer"] == 1


def test_wavlm_frames_with_layers_hold_each_states_frames(models):
    ws = clips()
    layered = load_encoder(str(models["wavlm"]), device="cpu", precision="fp32", pooling="frames", layers="all")
    got = layered.encode(ws).numpy()
    assert layered.feature_shape == (layered.t_max, 3, 32) == got.shape[1:]
    assert layered.settings()["layer"] == "all"
    counts = layered.frame_counts(np.array([len(w) for w in ws]))
    one = load_encoder(str(models["wavlm"]), device="cpu", precision="fp32", pooling="frames", layers="1")
    np.testing.assert_allclose(got[:, :, 1], one.encode(ws).numpy(), rtol=1e-5, atol=1e-6)
    assert one.feature_shape == (layered.t_max, 32) and one.settings()["layer"] == 1
    assert np.all(got[0, counts[0]:] == 0) and np.any(got[0, counts[0] - 1] != 0)
    # The frames of the last state, pooled, are the pooled store's last state.
    pooled = load_encoder(str(models["wavlm"]), device="cpu", precision="fp32").encode(ws).numpy()
    for i, n in enumerate(counts):
        np.testing.assert_allclose(got[i, :n, 2].mean(0), pooled[i, 2], rtol=1e-4, atol=1e-5)


def test_whisper_all_layers_equal_transformers_hidden_states(models):
    """Trimmed Whisper, all layers: each state is the mean over the clip's positions of the stock
    encoder's hidden_states[k], run on that clip alone (built for as many positions); the last is
    after the final layer norm, as transformers 5's hidden_states[-1] is for Whisper."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    enc = load_encoder(str(models["whisper"]), device="cpu", precision="fp32", window="trimmed", layers="all")
    ws = [tone(0.64, seed=5), tone(0.32, freq=200, seed=6)]
    ours = enc.encode(ws).numpy()
    assert ours.shape == (2, 3, 32) and enc.describe()["n_states"] == 3
    full = WhisperForConditionalGeneration.from_pretrained(models["whisper"]).model.encoder
    fe = WhisperFeatureExtractor.from_pretrained(models["whisper"])
    for i, w in enumerate(ws):
        n_pos = len(w) // 320
        config = WhisperConfig.from_pretrained(models["whisper"])
        config.max_source_positions = n_pos
        stock = WhisperEncoder(config).eval()
        state = full.state_dict()
        state["embed_positions.weight"] = state["embed_positions.weight"][:n_pos]
        stock.load_state_dict(state)
        # The log-mel of the clip followed by zeros (what our trimmed batch holds), cut to its frames.
        mel = fe(np.pad(w, (0, 400)), sampling_rate=SR, return_tensors="pt", padding="do_not_pad").input_features
        with torch.no_grad():
            out = stock(mel[..., : 2 * n_pos], output_hidden_states=True)
        torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
        ref = np.stack([h[0].mean(0).numpy() for h in out.hidden_states])
        assert_close_vectors(ours[i], ref)


def test_whisper_layers_in_the_window_and_frames(models):
    ws = clips()
    window = load_encoder(str(models["whisper"]), device="cpu", precision="fp32", layers="all")
    every = window.encode(ws).numpy()
    last = load_encoder(str(models["whisper"]), device="cpu", precision="fp32").encode(ws).numpy()
    np.testing.assert_array_equal(every[:, 2], last)  # the encoder runs once, whatever is kept
    assert not np.allclose(every[:, 0], every[:, 2], atol=1e-3)
    frames = load_encoder(str(models["whisper"]), device="cpu", precision="fp32", window="trimmed",
                          pooling="frames", layers="1,2")
    got = frames.encode(ws).numpy()
    assert got.shape == (3, 750, 2, 32) and frames.settings()["layer"] == [1, 2]
    one = load_encoder(str(models["whisper"]), device="cpu", precision="fp32", window="trimmed", pooling="frames",
                       layers="1")
    np.testing.assert_allclose(got[:, :, 0], one.encode(ws).numpy(), rtol=1e-5, atol=1e-6)
    assert one.settings()["layer"] == 1 and one.feature_shape == (750, 32)
    pooled = load_encoder(str(models["whisper"]), device="cpu", precision="fp32", window="trimmed",
                          layers="0,1").encode(ws).numpy()
    assert pooled.shape == (3, 2, 32)
    counts = frames.frame_counts(np.array([len(w) for w in ws]))
    assert np.all(got[0, counts[0]:] == 0) and np.any(got[0, counts[0] - 1] != 0)


def test_layers_refused_where_there_are_none(models):
    with pytest.raises(EncoderError, match="--layers all: .* xvector encoder"):
        load_encoder(str(models["xvector"]), device="cpu", layers="all")
    with pytest.raises(EncoderError, match="hidden states 0-2 .* 5 is outside them"):
        load_encoder(str(models["wavlm"]), device="cpu", layers="5")


def test_describe(models):
    d = load_encoder(str(models["wavlm"]), device="cpu").describe()
    assert d == {"family": "wavlm", "n_states": 3, "layers": [0, 1, 2], "hidden_size": 32, "frame_rate": 50.0,
                 "input": "waveform, normalised", "attention_mask": True, "emotion_trained": None,
                 "last_state": "after-final-layer-norm"}
    w = load_encoder(str(models["whisper"]), device="cpu", window="trimmed").describe()
    assert w["layers"] == [2] and w["input"] == "log-mel" and w["frame_rate"] == 50.0 and w["attention_mask"]
    x = load_encoder(str(models["xvector"]), device="cpu").describe()
    assert x["family"] == "wavlm-xvector" and x["hidden_size"] == 24 and x["input"] == "waveform"


# --- every family against transformers, with its own feature extractor ------------------------------

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TINY_CNN = dict(conv_dim=(16,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=32)


def _save(path, model, extractor):
    model.save_pretrained(path)
    extractor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def families(models, tmp_path_factory):
    """A tiny random model of each family, saved with its feature extractor as the hub's are: HuBERT
    Base-like (group-norm CNN, no attention mask, normalised input), wav2vec 2.0 Large-LV60-like
    (layer norm, stable layer norm, mask), data2vec-audio, W2V-BERT 2.0 (its filter banks), and the
    session's WavLM Large-like model."""
    from transformers import (
        Data2VecAudioConfig,
        Data2VecAudioModel,
        HubertConfig,
        HubertModel,
        SeamlessM4TFeatureExtractor,
        Wav2Vec2BertConfig,
        Wav2Vec2BertModel,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Model,
    )

    root = tmp_path_factory.mktemp("families")
    torch.manual_seed(0)
    normalised = dict(do_normalize=True, return_attention_mask=True)
    return {
        "wavlm": models["wavlm"],
        "hubert": _save(root / "hubert", HubertModel(HubertConfig(**TINY, **TINY_CNN, feat_extract_norm="group")),
                        Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False)),
        "wav2vec2": _save(root / "wav2vec2", Wav2Vec2Model(Wav2Vec2Config(**TINY, **TINY_CNN, feat_extract_norm="layer",
                                                                          do_stable_layer_norm=True)),
                          Wav2Vec2FeatureExtractor(**normalised)),
        "data2vec-audio": _save(root / "data2vec", Data2VecAudioModel(Data2VecAudioConfig(
            **TINY, **TINY_CNN, conv_pos_kernel_size=5)),
            Wav2Vec2FeatureExtractor(**normalised)),
        "wav2vec2-bert": _save(root / "w2v-bert", Wav2Vec2BertModel(Wav2Vec2BertConfig(
            **TINY, feature_projection_input_dim=160, conv_depthwise_kernel_size=5, left_max_position_embeddings=8,
            right_max_position_embeddings=8, vocab_size=32)), SeamlessM4TFeatureExtractor()),
    }


def _reference(path, family, ws, *, wrong=None):
    """Each clip alone through the family's own feature extractor and transformers' model: its hidden
    states (the last after the final layer norm where the model has one), mean over its valid frames.
    `wrong`: "normalisation" flips the extractor's normalisation; "mask" pads every clip to the
    longest and drops the attention mask (or, for a model without one, keeps the padding)."""
    import transformers
    from transformers import AutoFeatureExtractor

    from ser_cache.encoders.ssl import FAMILIES

    model = getattr(transformers, FAMILIES[family].model_class).from_pretrained(path).eval()
    fe = AutoFeatureExtractor.from_pretrained(path)
    kw = {}
    if wrong == "normalisation":
        if family == "wav2vec2-bert":
            kw["do_normalize_per_mel_bins"] = False
        else:
            fe.do_normalize = not fe.do_normalize
    longest = max(len(w) for w in ws)
    out = []
    for w in ws:
        if wrong == "mask":
            w = np.pad(w, (0, longest - len(w)))
        inputs = dict(fe(w, sampling_rate=SR, return_tensors="pt", **kw))
        mask = inputs.pop("attention_mask", None)
        if wrong == "mask":
            mask = None
        with torch.no_grad():
            o = model(**inputs, attention_mask=mask, output_hidden_states=True)
        states = list(o.hidden_states)
        if getattr(model.config, "do_stable_layer_norm", False):
            assert not torch.allclose(states[-1], o.last_hidden_state)  # transformers 5: before the norm
            states[-1] = o.last_hidden_state
        n = int(model._get_feat_extract_output_lengths(torch.tensor(len(ws[len(out)])))) if family != "wav2vec2-bert" \
            else int(mask.sum()) if mask is not None else states[0].shape[1]
        out.append(np.stack([h[0, :n].mean(0).numpy() for h in states]))
    return np.stack(out)


def _rel_err(a, b):
    return float((np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)).max())


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # stock WavLM, the reference
@pytest.mark.parametrize("family", ["wavlm", "hubert", "wav2vec2", "data2vec-audio", "wav2vec2-bert"])
def test_each_family_equals_transformers_with_its_own_input_convention(families, family):
    path = families[family]
    enc = load_encoder(str(path), device="cpu", precision="fp32")
    assert enc.kind == family and enc.settings()["kind"] == family and enc.settings()["layer"] == "all"
    ws = clips()
    ours = enc.encode(ws).numpy()
    assert ours.shape == (3, 3, 32)
    ref = _reference(path, family, ws)
    assert_close_vectors(ours, ref)
    # The same computed the wrong way is told apart: the normalisation, and the mask (or, for a model
    # trained without one, the padding its clips never see).
    assert _rel_err(ours, _reference(path, family, ws, wrong="normalisation")) > 1e-2
    assert _rel_err(ours[1:], _reference(path, family, ws, wrong="mask")[1:]) > 1e-2
    d = enc.describe()
    assert d["family"] == family and d["n_states"] == 3 and d["frame_rate"] == 50.0
    assert d["input"] == {"wav2vec2-bert": "fbank", "hubert": "waveform, normalised"}.get(family, d["input"])
    assert d["attention_mask"] == (family != "hubert")
    stable = family in ("wavlm", "wav2vec2")  # the tiny models built with do_stable_layer_norm
    assert d["last_state"] == ("after-final-layer-norm" if stable else "encoder-output")
    assert ("input" in enc.settings()) == (family == "wav2vec2-bert")


@pytest.mark.parametrize("family", ["hubert", "wav2vec2-bert"])
def test_family_frames_with_layers_and_subsets(families, family):
    ws = clips()
    path = families[family]
    every = load_encoder(str(path), device="cpu", precision="fp32").encode(ws).numpy()
    two = load_encoder(str(path), device="cpu", precision="fp32", layers="0,2").encode(ws).numpy()
    np.testing.assert_allclose(two, every[:, [0, 2]], rtol=1e-5, atol=1e-6)
    frames = load_encoder(str(path), device="cpu", precision="fp32", pooling="frames", layers="all")
    got = frames.encode(ws).numpy()
    counts = frames.frame_counts(np.array([len(w) for w in ws]))
    assert got.shape == (3, frames.t_max, 3, 32) and frames.t_max == 749
    if family == "wav2vec2-bert":  # the frames its extractor marks valid, each clip alone
        from transformers import SeamlessM4TFeatureExtractor

        fe = SeamlessM4TFeatureExtractor.from_pretrained(path)
        expected = [int(fe(w, sampling_rate=SR)["attention_mask"].sum()) for w in ws]
    else:  # the CNN's output length: (n - 400) // 320 + 1 for this stack of strides
        expected = [(len(w) - 400) // 320 + 1 for w in ws]
    assert list(counts) == expected
    for i, n in enumerate(counts):
        assert np.all(got[i, n:] == 0)
        np.testing.assert_allclose(got[i, :n].mean(0), every[i], rtol=1e-4, atol=1e-5)
    if family == "wav2vec2-bert":  # a clip shorter than one frame pair is padded to one
        tiny = [tone(0.02, seed=7)]
        assert list(frames.frame_counts(np.array([len(tiny[0])]))) == [1]
        row = frames.encode(tiny).numpy()[0]
        assert np.abs(row[0]).sum() > 0 and not row[1:].any()


def test_kind_is_detected_from_the_config_and_ssl_is_one_kind(families, models):
    from ser_cache.encoders import detect_kind

    for family, path in families.items():
        assert detect_kind(str(path)) == family
        assert load_encoder(str(path), kind="ssl", device="cpu", layers="last").kind == family
    assert load_encoder(str(families["hubert"]), kind="wavlm", device="cpu", layers="1").kind == "hubert"
    with pytest.raises(EncoderError, match="--kind whisper: .* a hubert model"):
        load_encoder(str(families["hubert"]), kind="whisper", device="cpu")
