"""The registry of short names: the four names the code has always known keep their hub ids and kinds,
the issue's list is there, its figures agree with each other, and no entry is emotion-trained."""

from ser_cache.encoders import HUB_IDS, KNOWN_MODELS, detect_kind
from ser_cache.encoders.registry import REGISTRY, by_hub_id


def test_the_old_short_names_are_unchanged():
    old = {"whisper-large-v3": ("openai/whisper-large-v3", "whisper"),
           "roberta-large": ("FacebookAI/roberta-large", "text"),
           "wavlm-large": ("microsoft/wavlm-large", "wavlm"),
           "wavlm-base-plus-sv": ("microsoft/wavlm-base-plus-sv", "xvector")}
    for name, (hub_id, kind) in old.items():
        assert (KNOWN_MODELS[name].hub_id, KNOWN_MODELS[name].kind) == (hub_id, kind)
        assert HUB_IDS[name] == hub_id and detect_kind(name) == kind


def test_the_issues_encoders_and_their_states():
    states = {"wavlm-base": 13, "wavlm-base-plus": 13, "wavlm-large": 25, "hubert-base-ls960": 13,
              "hubert-large-ll60k": 25, "hubert-xlarge-ll60k": 49, "wav2vec2-base": 13, "wav2vec2-large": 25,
              "wav2vec2-large-lv60": 25, "wav2vec2-large-robust": 25, "xls-r-300m": 25, "xls-r-1b": 49,
              "xls-r-2b": 49, "data2vec-audio-base": 13, "data2vec-audio-large": 25, "w2v-bert-2.0": 25,
              "whisper-tiny": 5, "whisper-base": 7, "whisper-small": 13, "whisper-medium": 25, "whisper-large": 33,
              "whisper-large-v2": 33, "whisper-large-v3": 33, "whisper-large-v3-turbo": 33}
    for name, n in states.items():
        assert REGISTRY[name].states == n, name
        assert by_hub_id(REGISTRY[name].hub_id.upper()) is REGISTRY[name]
    assert len({e.hub_id for e in REGISTRY.values()}) == len(REGISTRY)
    for e in REGISTRY.values():
        assert e.emotion_trained is False, e.name  # the challenge forbids emotion-pretrained encoders
        if e.kind == "whisper":
            assert e.input == "log-mel" and e.hub_id == f"openai/{e.name}"
        elif e.kind == "wav2vec2-bert":
            assert e.input == "fbank" and e.attention_mask
    assert by_hub_id("someone/unknown") is None
