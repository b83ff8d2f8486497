"""What every fine-tuned (online) model shares, whatever its encoder: the encoder component, the pooled
vector, the heads, which parameters train, and which weights a run must keep.

    waveform → encoder component (WavLM: system.finetuned; Whisper: system.whisper_finetuned)
             → hidden states → [layer weighting] → point-wise Conv1d stack (model.ConvPool)
             → mean over the valid frames → [concatenated with cached features] → MultitaskHeads

An encoder component is a subclass of OnlineModel that sets `encoder_attr` (the attribute holding the
encoder, hence its weights' prefix in a run: "wavlm.*", "whisper.*") and `input_name` (the heads'
input of the pooled vector), and implements `pooled(audio, lengths)`. The loop (finetune.loop),
the checkpoints, DDP, samplers, losses and scoring see only this interface.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ser_cache.data import audio as audio_lib

# A run's config.json records where its encoder's weights live (the encoder's "weights" entry):
WEIGHTS_IN_RUN = "run"  # model.safetensors holds the whole model (full fine-tuning; every run before LoRA)
WEIGHTS_FROM_BASE = "base"  # model.safetensors holds what trained; the frozen encoder comes from model_id@revision


class OnlineModel(nn.Module):
    """An encoder component, the point-wise convolutions and pooling (`pool`) and the heads (`heads`).

    `forward(audio, lengths, cached)` takes right-padded raw 16 kHz waveforms (B, T), their real
    lengths in samples, and the cached inputs {name: (B, *shape)}; it returns the heads' outputs.
    """

    encoder_attr = "encoder"
    input_name = "audio"

    @property
    def encoder(self) -> nn.Module:
        return getattr(self, self.encoder_attr)

    def pooled(self, audio: Tensor, lengths: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encoder_context(self):
        """No autograd graph through an encoder none of whose weights train (--freeze-encoder): its
        activations are not kept for a backward pass, which is what makes frozen training cheap."""
        if any(p.requires_grad for p in self.encoder.parameters()):
            return contextlib.nullcontext()
        return torch.no_grad()

    def forward(self, audio: Tensor, lengths: Tensor, cached: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        pooled = self.pooled(audio, lengths)
        # The heads and the loss run in float32 whatever the encoder's autocast: a CCC computed
        # from bfloat16 predictions would lose most of its precision.
        with torch.autocast(device_type=audio.device.type, enabled=False):
            return self.heads({self.input_name: pooled.float(), **(cached or {})})


def freeze_unused(model: OnlineModel) -> list[str]:
    """Freeze the encoder parameters that cannot reach the output; returns their names.

    With the last state taken after the final layer norm (as the authors), every transformer
    parameter reaches the output; what is left is what the encoder holds for pre-training only
    (e.g. a quantizer in some WavLM checkpoints). DDP refuses trainable parameters that get no
    gradient, and AdamW would only decay them. Found by one backward pass in eval mode (no dropout,
    no masking, no LayerDrop: no random numbers drawn); the spec-augment mask embedding, used in
    training mode only, is left alone.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    audio = torch.randn(1, audio_lib.SAMPLE_RATE, generator=torch.Generator().manual_seed(0)).to(device)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        model.pooled(audio, torch.tensor([audio.shape[1]], device=device)).sum().backward()
    unused = [n for n, p in model.encoder.named_parameters()
              if p.requires_grad and p.grad is None and "masked_spec_embed" not in n]
    params = dict(model.encoder.named_parameters())
    for name in unused:
        params[name].requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return unused


def freeze_encoder(model: OnlineModel) -> None:
    """--freeze-encoder: no encoder weight trains (the layer weighting, convolutions and heads do)."""
    for p in model.encoder.parameters():
        p.requires_grad_(False)


def run_state(model: OnlineModel, weights: str) -> dict[str, Tensor]:
    """The weights a run keeps: the whole model (WEIGHTS_IN_RUN), or all but the frozen encoder's own
    weights (WEIGHTS_FROM_BASE: the LoRA adapters, layer weighting, convolutions and heads), so that a
    LoRA run of Whisper large-v3 is megabytes. Buffers outside the encoder are kept either way."""
    state = model.state_dict()
    if weights == WEIGHTS_IN_RUN:
        return state
    prefix = model.encoder_attr + "."
    return {k: v for k, v in state.items() if not k.startswith(prefix) or ".lora_" in k}


def encoder_weights_kept(arch: Mapping) -> str:
    """Where a run's encoder weights live (config.json's encoder entry); runs before LoRA: in the run."""
    return str(arch.get("weights", WEIGHTS_IN_RUN))
