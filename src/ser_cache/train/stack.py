"""K models of one architecture trained as one: parameters stacked along a leading member axis.

`ser-cache sweep` trains seeds and variants of the heads together. Their models have the same
shapes, so instead of K small matrix products per layer it does one batched product: the K
members' parameters are stacked ((K, out, in) instead of (out, in)) and the ordinary module
(model.FeatureModel, the same code train-heads runs) is called under `torch.func.vmap` through
`functional_call`. Nothing about the architecture is written twice: member k of the stack computes
exactly what a FeatureModel with member k's weights computes (a test checks it).

What vmap cannot batch stays per member: the loss (it has data-dependent branches, e.g. batches in
which no speaker is known) and the AAM-softmax over each member's own speaker classes. Both are
small next to the heads' products.

`StackedAdamW` updates the stacked parameters with torch's own AdamW kernel (fused where torch has
one), called on each member's slices, so every member takes exactly the steps an ordinary AdamW on
its own parameters would take — with its own learning rate and weight decay, and only on the steps
where it has a batch (members with fewer training rows per epoch sit out the last steps).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

__all__ = ["MemberStack", "OneMember", "StackedAdamW", "stack_of"]


def stack_of(models: Sequence[nn.Module], aams: Sequence[nn.Module | None]):
    """K models as one: a MemberStack, or for one model the model itself (OneMember), which trains
    exactly as a model of its own does (train-heads), without functional_call's and vmap's overhead."""
    if len(models) == 1:
        return OneMember(models[0], aams[0])
    return MemberStack(models, aams)


class OneMember:
    """One model behind MemberStack's interface: outputs with a member axis of 1, its own parameters,
    torch's AdamW over them (fused where torch has it), as train-heads always trained."""

    k = 1

    def __init__(self, model: nn.Module, aam: nn.Module | None) -> None:
        self.model, self.aam = model, aam

    def parameters(self) -> dict[str, Tensor]:
        params = dict(self.model.named_parameters())
        if self.aam is not None:
            params["aam.weight"] = self.aam.weight
        return params

    def optimizer(self, lrs: Sequence[float], weight_decays: Sequence[float], *, fused: bool):
        return _OneAdamW(torch.optim.AdamW(list(self.parameters().values()), lr=lrs[0], weight_decay=weight_decays[0],
                                           **({"fused": True} if fused else {})))

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def eval(self) -> None:
        self.model.train(False)

    def forward(self, inputs: Mapping[str, Any], *, shared: bool = False) -> dict[str, Tensor]:
        x = inputs if shared else {n: tuple(t[0] for t in v) if isinstance(v, tuple) else v[0]
                                   for n, v in inputs.items()}
        return {key: v.unsqueeze(0) for key, v in self.model(dict(x)).items()}

    def speaker_loss(self, k: int, embedding: Tensor, labels: Tensor) -> Tensor | None:
        return None if self.aam is None else self.aam(embedding, labels)

    def member_state(self, k: int) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        state = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
        return state, ({"weight": self.aam.weight.detach().clone()} if self.aam is not None else None)


class _OneAdamW:
    """torch.optim.AdamW with StackedAdamW's step(active): one member, always the one stepping."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, active: Sequence[bool] | None = None) -> None:
        if active is None or active[0]:
            self.optimizer.step()


class MemberStack:
    """K FeatureModels (and their AAM-softmax class weights) as stacked parameters.

    `forward(inputs)` takes the members' inputs stacked on a leading axis ({name: (K, B, ...)}, or
    ((K, B, T, D) frames, (K, B) lengths)); with `shared=True` every member gets the same unstacked
    inputs (evaluation on the same rows). Outputs carry the member axis first.
    """

    def __init__(self, models: Sequence[nn.Module], aams: Sequence[nn.Module | None]) -> None:
        if not models or len(models) != len(aams):
            raise ValueError("a stack needs one AAM (or None) for each of at least one model")
        self.k = len(models)
        params, self.buffers = stack_module_state(list(models))
        # Weight matrices are stored transposed, (K, in, out) instead of (K, out, in), and handed to
        # the module as transposed views: the batched product's weight gradient then comes out in
        # the stored layout. Stored as (K, out, in), every step paid a strided copy of each weight
        # gradient that took longer than the products (measured: 28 ms against 9 ms a step for
        # one 2816→256 layer of 10 members on 2 CPU cores).
        self.transposed = {name for name, p in params.items() if p.ndim >= 3}
        self.params = {name: nn.Parameter(p.detach().transpose(1, 2).contiguous() if name in self.transposed
                                          else p.detach()) for name, p in params.items()}
        # The architecture without weights: functional_call puts the members' weights into it.
        self.template = copy.deepcopy(models[0]).to("meta")
        has_aam = [a is not None for a in aams]
        if any(has_aam) and not all(has_aam):
            raise ValueError("either every member of a stack has a speaker head or none has")
        self.aams = [copy.deepcopy(a).to("meta") if a is not None else None for a in aams]
        self.aam_weight = (nn.Parameter(torch.stack([a.weight.detach() for a in aams]))
                           if all(has_aam) else None)

    def parameters(self) -> dict[str, Tensor]:
        """Every stacked parameter (the AAM's as "aam.weight"), each (K, ...)."""
        out = dict(self.params)
        if self.aam_weight is not None:
            out["aam.weight"] = self.aam_weight
        return out

    def train(self, mode: bool = True) -> None:
        self.template.train(mode)

    def eval(self) -> None:
        self.template.train(False)

    def _views(self) -> dict[str, Tensor]:
        """The stacked parameters in the module's own layout (views of the stored ones)."""
        return {name: p.transpose(1, 2) if name in self.transposed else p for name, p in self.params.items()}

    def forward(self, inputs: Mapping[str, Any], *, shared: bool = False) -> dict[str, Tensor]:
        def one(params, buffers, x):
            return functional_call(self.template, (params, buffers), (x,))

        return vmap(one, in_dims=(0, 0, None if shared else 0), randomness="different")(
            self._views(), self.buffers, dict(inputs))

    def optimizer(self, lrs: Sequence[float], weight_decays: Sequence[float], *, fused: bool) -> StackedAdamW:
        return StackedAdamW(self.parameters(), lrs, weight_decays, fused=fused)

    def speaker_loss(self, k: int, embedding: Tensor, labels: Tensor) -> Tensor | None:
        """Member k's AAM-softmax loss on its (B, D) speaker embeddings; None without a speaker head."""
        if self.aam_weight is None:
            return None
        return functional_call(self.aams[k], {"weight": self.aam_weight[k]}, (embedding, labels))

    def member_state(self, k: int) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """Copies of member k's model state dict and AAM state dict (None without a speaker head)."""
        # Not persistent buffers (a LayerPick's one-hot) are stacked too, but are no part of a state dict.
        keep = self.template.state_dict().keys()
        state = {name: t[k].detach().clone(memory_format=torch.contiguous_format)
                 for name, t in {**self._views(), **self.buffers}.items() if name in keep}
        aam = {"weight": self.aam_weight[k].detach().clone()} if self.aam_weight is not None else None
        return state, aam


class StackedAdamW:
    """AdamW on stacked parameters, member by member: each with its own lr and weight decay.

    `step(active)` updates only the members in `active`; the others keep parameters, moments and
    step count. Members that share (lr, weight decay) go through one call of torch's AdamW
    (`torch.optim.adamw.adamw`, the function behind torch.optim.AdamW) on their slices, so a member
    is updated bit for bit as torch.optim.AdamW would update a model of its own.
    """

    def __init__(self, params: Mapping[str, Tensor], lrs: Sequence[float], weight_decays: Sequence[float], *,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, fused: bool = False) -> None:
        self.params = list(params.values())
        self.k = len(lrs)
        if len(weight_decays) != self.k or any(p.shape[0] != self.k for p in self.params):
            raise ValueError(f"expected {self.k} members in every parameter and a weight decay for each")
        self.lrs, self.weight_decays = [float(x) for x in lrs], [float(x) for x in weight_decays]
        self.betas, self.eps, self.fused = betas, eps, fused
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        # One step count per member and parameter, as torch keeps one per parameter (the kernel
        # increments every tensor it is given). float32 on the device, as torch's fused AdamW keeps it.
        self.steps = [[torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]
                      for _ in range(self.k)]
        self._cache: dict[tuple, tuple[list, list, list, list]] = {}

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: Sequence[bool] | None = None) -> None:
        from torch.optim.adamw import adamw

        members = [k for k in range(self.k) if active is None or active[k]]
        groups: dict[tuple[float, float], list[int]] = {}
        for k in members:
            groups.setdefault((self.lrs[k], self.weight_decays[k]), []).append(k)
        with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
        for (lr, wd), ks in groups.items():
            if not with_grad:
                continue
            params, exp_avgs, exp_avg_sqs, steps = ([x for k in ks for x in self._slices(k, with_grad)[n]]
                                                    for n in range(4))
            adamw(params, [self.params[i].grad[k] for k in ks for i in with_grad], exp_avgs, exp_avg_sqs, [], steps,
                  foreach=False if not self.fused else None, fused=self.fused or None, amsgrad=False,
                  beta1=self.betas[0], beta2=self.betas[1], lr=lr, weight_decay=wd, eps=self.eps, maximize=False)

    def _slices(self, k: int, which: list[int]) -> tuple[list, list, list, list]:
        """Member k's parameters, moments and step counts (of the parameters `which`), as views made once."""
        key = (k, tuple(which))
        if key not in self._cache:
            self._cache[key] = ([self.params[i][k] for i in which], [self.exp_avg[i][k] for i in which],
                                [self.exp_avg_sq[i][k] for i in which], [self.steps[k][i] for i in which])
        return self._cache[key]
