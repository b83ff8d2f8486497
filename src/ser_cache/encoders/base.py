"""What every frozen encoder shares: finding its weights, the device and precision, pooling."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ser_cache.infra.runtime import (
    AUTO_CUDA_HALF,
    ENCODER_PRECISIONS,
    DeviceError,
    autocast,
    precision_dtype,
    resolve_device,
    resolve_precision,
)

POOLED = ("mean", "mean+std")  # one vector per utterance (or per layer)
FRAMES = "frames"  # every valid frame of the last layer, (T_max, D) per utterance
POOLINGS = (*POOLED, FRAMES)
XVECTOR = "xvector"  # an x-vector encoder's own statistics pooling, as its stores' settings record it
# Audio encoders whose hidden states can be kept frame by frame: Whisper and the self-supervised
# families (encoders.ssl.SSL_FAMILIES), by the kind a store records.
FRAME_KINDS = ("whisper", "wavlm", "hubert", "wav2vec2", "data2vec-audio", "wav2vec2-bert")


class EncoderError(Exception):
    """An encoder cannot be loaded or run as asked; the message names the model and what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are: `source` goes to from_pretrained; `revision` identifies the weights."""

    name: str  # what the user typed
    model_id: str  # hub id, or the absolute local directory
    source: str  # hub id or local directory
    local_only: bool  # the files are on disk: never touch the network
    is_local_dir: bool


@dataclass(frozen=True)
class RuntimeOptions:
    """How an encoder runs; none of these change the stored numbers beyond precision noise."""

    device: str = "auto"
    precision: str = "auto"
    extra: dict = field(default_factory=dict)

    def torch_device(self) -> torch.device:
        return resolve_device(self.device, check=False)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """bf16 by default on CUDA (fp16 where bf16 is unsupported); full precision on CPU."""
        try:
            return precision_dtype(resolve_precision(self.precision, device, allowed=ENCODER_PRECISIONS,
                                                     auto=AUTO_CUDA_HALF))
        except DeviceError as exc:
            raise EncoderError(str(exc)) from None


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
GENERIC_HUB_ID = "hub ids look like owner/name"


def offline_variable() -> str | None:
    """`NAME=value` of the first environment variable that keeps Hugging Face off the network, or None."""
    for var in OFFLINE_VARIABLES:
        value = os.environ.get(var, "")
        if value.strip().lower() not in ("", "0", "false", "no", "off"):
            return f"{var}={value}"
    return None


def looks_like_path(name: str) -> bool:
    """Whether --model `name` can only mean a local directory: it starts with `/`, `.` or `~`, holds
    a backslash or more than one `/`, or its first folder exists here (`runs/model` with `runs/`
    present). A hub id is `owner/name`: exactly one `/`, neither part a dot."""
    if name.startswith(("/", ".", "~")) or "\\" in name:
        return True
    parts = name.rstrip("/").split("/")
    if len(parts) > 2:
        return True
    return len(parts) == 2 and Path(parts[0]).is_dir()


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id that is not a valid repo name is handled by the load error below
        return False


def resolve_model(name: str, hub_ids: dict[str, str]) -> ResolvedModel:
    """A short name, a Hugging Face id or a local directory → where from_pretrained should look.

    A model already in the local Hugging Face cache is loaded with local_files_only, so a cached
    model works offline with no network wait. A name that can only be a path and is not a
    directory, or a bare name that is neither a short name nor cached, fails here with one line,
    before the hub is asked about it.
    """
    p = Path(name).expanduser()
    if p.is_dir():
        d = str(p.resolve())
        return ResolvedModel(name=name, model_id=d, source=d, local_only=True, is_local_dir=True)
    repo_id = hub_ids.get(name, name)
    cached = _in_hub_cache(repo_id)
    known = f"a short name ({', '.join(hub_ids)}), " if hub_ids else ""
    if not cached and (looks_like_path(name) or p.exists()):
        what = "a file, not a directory" if p.exists() else "no such directory"
        raise EncoderError(f"--model {name}: {what}: {name}; expected a folder holding the model's config.json "
                           f"and weights, {known}or a hub id owner/name")
    if not cached and name not in hub_ids and "/" not in name:
        # The hub still redirects a few legacy bare ids (bert-base-uncased), but a new user's bare
        # name is far more often a typo or a wished-for model (whisper-large-v4).
        short = f"not a known short name (known: {', '.join(hub_ids)})" if hub_ids else "not a cached model"
        raise EncoderError(f"--model {name}: {short} nor a local directory; {GENERIC_HUB_ID}")
    offline = offline_variable() is not None
    resolved = ResolvedModel(name=name, model_id=repo_id, source=repo_id, local_only=cached or offline,
                             is_local_dir=False)
    if not resolved.local_only:
        problem = hub_unreachable()
        if problem:  # fail now with one message, not after a minute of download retries
            raise load_error(resolved, OSError(problem))
    return resolved


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """None when the Hugging Face endpoint accepts a TCP connection, else why not."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:
        endpoint = "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"no connection to {host}:{port}: {exc.strerror or exc}"
    return None


@contextlib.contextmanager
def quiet_loading():
    """Keep transformers' per-key load report and progress bars off the user's terminal.

    Missing weights are checked by `check_loading_info` instead, with one clear message.
    """
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_error(resolved: ResolvedModel, exc: BaseException) -> EncoderError:
    """One message for 'cannot get these weights', naming the model, the cause and how to pass a local directory."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if resolved.is_local_dir:
        return EncoderError(f"model '{resolved.name}': the directory could not be loaded ({reason})")
    offline = offline_variable()
    cause = (f"{offline} is set, so the hub was not tried (unset it to download)" if offline
             else f"the hub could not be reached ({reason})")
    return EncoderError(
        f"model '{resolved.name}' ({resolved.model_id}) is neither a local directory nor in the local "
        f"Hugging Face cache, and {cause}. On a machine with internet run "
        f"`hf download {resolved.model_id} --local-dir DIR`, copy DIR here and pass --model DIR."
    )


def pickled_weights_error(resolved: ResolvedModel, exc: BaseException) -> EncoderError:
    """A pickled weights file (pytorch_model.bin) that torch refused to unpickle with weights_only=True:
    it holds more than tensors. ser-cache never loads such a file the unsafe way."""
    # torch's message advises weights_only=False; pass on only what it found in the file.
    found = [line.strip() for line in str(exc).splitlines() if "WeightsUnpickler error" in line]
    reason = found[0].split(":", 1)[-1].strip().split(". ")[0] if found else type(exc).__name__
    return EncoderError(f"model '{resolved.name}' ({resolved.source}): its weights are a pickle (pytorch_model.bin) "
                        f"that cannot be loaded safely ({reason}); safetensors weights are needed: save the model "
                        "with save_pretrained (it writes model.safetensors) where you trust its source")


def weights_revision(model: torch.nn.Module, resolved: ResolvedModel) -> str:
    """The hub commit when loaded from the hub; otherwise a digest of the local files.

    The digest covers the config and the full weight files, so a re-trained model saved into the
    same directory gets a new fingerprint and its store is not silently resumed.
    """
    commit = getattr(model.config, "_commit_hash", None)
    if commit and not resolved.is_local_dir:
        return str(commit)
    if not resolved.is_local_dir:
        return "unknown"
    h = hashlib.sha256()
    root = Path(resolved.source)
    for f in sorted(root.iterdir()):
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin", ".txt", ".model")
                            or f.name.startswith("tokenizer")):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def check_loading_info(name: str, info: dict, required_prefixes: tuple[str, ...] = ("",)) -> None:
    """Refuse a model whose checkpoint lacks weights the encoder needs (they would be random)."""
    missing = [k for k in info.get("missing_keys", []) if any(k.startswith(p) for p in required_prefixes)]
    # Buffers and fixed tables that transformers rebuilds deterministically are not a problem.
    missing = [k for k in missing if not k.endswith(("position_ids", "embed_positions.weight", "masked_spec_embed"))]
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise EncoderError(f"model '{name}': the checkpoint lacks {len(missing)} weight(s) the encoder needs ({shown})")


def load_pretrained(cls, resolved: ResolvedModel, *, required_prefixes: tuple[str, ...] = ("",),
                    optional=lambda key: False, **kwargs):
    """`cls.from_pretrained` on a resolved model, quietly, with our two clear errors.

    One when the weights cannot be had at all (`load_error`), one when the checkpoint lacks
    weights the caller needs (`check_loading_info`); missing keys for which `optional(key)` is
    true are parts the caller never uses.
    """
    import pickle

    try:
        with quiet_loading():
            model, info = cls.from_pretrained(resolved.source, local_files_only=resolved.local_only,
                                              output_loading_info=True, **kwargs)
    except pickle.UnpicklingError as exc:
        raise pickled_weights_error(resolved, exc) from None
    except (OSError, ValueError) as exc:
        raise load_error(resolved, exc) from None
    missing = [k for k in info.get("missing_keys", []) if not optional(k)]
    check_loading_info(resolved.name, {"missing_keys": missing}, required_prefixes)
    return model


def masked_pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool (B, T, D) over the first `lengths[b]` frames: mean, or mean and std concatenated.

    Padding never enters the statistics, so an utterance's features do not depend on its batch.
    The std is the population std (ddof 0); it is 0 for a single frame.
    """
    if pooling not in POOLED:
        raise EncoderError(f"--pooling {pooling}: expected one of {', '.join(POOLED)} to pool frames")
    t = hidden.shape[1]
    mask = (torch.arange(t, device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
    count = mask.sum(1, keepdim=True).clamp_min(1.0)
    m = mask.unsqueeze(-1)
    mean = (hidden * m).sum(1) / count
    if pooling == "mean":
        return mean
    var = (((hidden - mean.unsqueeze(1)) ** 2) * m).sum(1) / count
    return torch.cat([mean, var.clamp_min(0).sqrt()], dim=-1)


def keep_frames(hidden: torch.Tensor, counts: torch.Tensor, t_max: int) -> torch.Tensor:
    """(B, T, D) → (B, t_max, D): each row's first `counts[b]` frames, zeros after them.

    The zeros make a row independent of its batch (padded frames hold whatever attention over
    padding gives) and cost almost nothing in a compressed store.
    """
    hidden = hidden[:, :t_max]
    keep = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < counts[:, None]
    hidden = torch.where(keep.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
    return F.pad(hidden, (0, 0, 0, t_max - hidden.shape[1]))


def pooled_dim(d: int, pooling: str) -> int:
    return d * 2 if pooling == "mean+std" else d


def emotion_trained(model_id: str) -> bool | None:
    """Whether a model (by hub id) was trained on emotion labels, as the registry records it; None
    for a model the registry does not know (a local directory, an unlisted hub id)."""
    from ser_cache.encoders.registry import by_hub_id

    entry = by_hub_id(model_id)
    return None if entry is None else entry.emotion_trained


class Pending:
    """Features on their way to the host: `result()` waits for the device, then returns them."""

    def __init__(self, host: torch.Tensor, event=None):
        self.host = host
        self.event = event

    def result(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()  # releases the GIL: other threads run meanwhile
            self.event = None
        return self.host


class Encoder:
    """A frozen encoder: `encode(batch)` → float32 features (B, *feature_shape) on the CPU.

    `encode` is `launch(prepare(batch)).result()`, in three steps so that a caller can overlap
    them (extract does): `prepare` is the host's share (padding into pinned memory, tokenising)
    and may run in a helper thread; `launch` queues the device's share and an asynchronous copy
    of the result to the host, and returns at once on a GPU; `result` waits for it.

    Subclasses set `kind`, `modality` ("audio" or "text") and implement `prepare` and
    `_forward`. `settings()` lists every option that changes the numbers; it goes into the
    store's fingerprint.
    """

    kind: str = ""
    modality: str = "audio"

    @property
    def pin(self) -> bool:
        """Whether host tensors for this encoder should be page-locked (it runs on a GPU)."""
        return self.device.type == "cuda"

    def __init__(self, resolved: ResolvedModel, model: torch.nn.Module, runtime: RuntimeOptions):
        self.resolved = resolved
        self.device = runtime.torch_device()
        self.autocast_dtype = runtime.autocast_dtype(self.device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.revision = weights_revision(self.model, resolved)

    @property
    def model_id(self) -> str:
        return self.resolved.model_id

    @property
    def feature_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def frame_level(self) -> bool:
        """Keeps every frame (--pooling frames): feature_shape is (T_max, D), and `frame_counts`
        says how many of a row's T_max frames are valid (the rest are zeros)."""
        return False

    def frame_counts(self, n_samples: np.ndarray) -> np.ndarray:
        """Valid frames (int64) of clips of `n_samples` samples at 16 kHz; frame encoders only."""
        raise EncoderError(f"model '{self.resolved.name}': a pooled {self.kind} encoder has no frame counts "
                           "(they exist with --pooling frames)")

    def settings(self) -> dict:
        return {"kind": self.kind, "model_id": self.model_id, "revision": self.revision}

    def describe(self) -> dict:
        """What the encoder is, for people and for stage two (a store's "encoder" attribute, not part
        of its fingerprint): its family, its hidden states (`n_states`) and those it keeps
        (`layers`, in the order of a store's layer axis), hidden size, frames per second (None
        without frames), its input ("waveform, normalised", "waveform", "log-mel", "fbank", "text"),
        whether padding is masked, whether it was trained on emotion (None: not known), and which
        last state it gives. Subclasses fill in what they know."""
        return {"family": self.kind, "n_states": None, "layers": None, "hidden_size": None, "frame_rate": None,
                "input": None, "attention_mask": None, "emotion_trained": emotion_trained(self.model_id),
                "last_state": None}

    def cost(self, seconds: float) -> float:
        """Seconds of padded input one utterance costs in a batch (for batches by total seconds)."""
        return seconds

    def autocast(self):
        return autocast(self.device, self.autocast_dtype)

    def encode(self, batch: list) -> torch.Tensor:
        return self.launch(self.prepare(batch)).result()

    def prepare(self, batch: list):
        """Host-side work for a batch (no device work); safe to run in one helper thread."""
        return batch

    @torch.inference_mode()
    def launch(self, prepared) -> Pending:
        """Queue the forward pass and the copy of its result to the host."""
        with self.autocast():
            out = self._forward(prepared)
        out = out.float()
        if self.device.type != "cuda":
            return Pending(out.cpu())
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return Pending(host, event)

    def _forward(self, prepared) -> torch.Tensor:
        raise NotImplementedError


def pad_waves(waves: list[np.ndarray], multiple: int = 1, min_length: int = 0,
              pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad waveforms with zeros into a (B, T) float32 tensor; returns it and the lengths.

    With `pin`, both are allocated in page-locked memory, for a GPU: their copies to the device
    then run asynchronously (a copy from pageable memory would first wait for all the work queued
    on the device, the previous batch included), and no second copy is made to pin them.
    """
    lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
    if pin:
        lengths = lengths.pin_memory()
    t = max(int(lengths.max()), min_length)
    t = -(-t // multiple) * multiple
    out = torch.zeros(len(waves), t, dtype=torch.float32, pin_memory=pin)
    for i, w in enumerate(waves):
        out[i, : len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
    return out, lengths


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
