"""Per-token scores of training blocks from a stored query direction P, in two definitions.

`loss-term` (default, the paper's): S[i, t] = <P, grad_theta l_t>, the influence of block i's loss term l_t
(the prediction of token t+1, which the suppression objective weights at t). All positions of a block come
from one Jacobian-vector product of theta -> (l_1 .. l_T) along P: forward mode, no backward pass, nothing
stored. With `influence.include_head`, the LM head's part is closed-form: (p_t - e_{y_t}) . (P_head h_t).

`kronfluence` (Kronfluence's `compute_per_token_scores`): S[i, t] = sum_m g_{m,t} . (P_m a_{m,t}), with
a_{m,t} the input of module m at position t and g_{m,t} the gradient of the block's *summed* loss with respect
to its output there. It splits the block's influence by where the computation happens, so it differs from
`loss-term` for every module whose output at t reaches later positions. It equals d(sum_t l_t)/d eps_t when
each tracked module's output at t moves by eps_t * (P_m a_{m,t}): one backward pass.

Both sum over t to the block's influence <P, grad sum_t l_t>; the last position has no loss term and scores 0.

`normalize: relative` (loss-term only, an option beside the paper's raw scores) divides each score by the norm
of grad l_t with respect to the last hidden state, W^T (p_t - e_y): a cheap stand-in for the token's own
gradient size, in the spirit of relative influence (RelatIF). High-loss tokens (byte pieces, rare characters)
carry large gradients and dominate raw dot products; relative scores rank by alignment with P instead.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call

from ..errors import IfguideError
from ..names import TokenScores
from .task import next_token_labels

TOKEN_SCORES: tuple[str, ...] = get_args(TokenScores)


def _weight_and_bias(linear: nn.Linear, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a [dW | db] direction into its weight and bias parts."""
    return p[:, : linear.in_features], (p[:, linear.in_features] if linear.bias is not None else None)


class LossTermScorer:
    """S[:, t] = <P, grad l_t> for a batch of blocks, by one forward-mode pass (eager attention: SDPA has no
    forward-mode rule)."""

    def __init__(self, model: nn.Module, direction: dict[str, torch.Tensor], relative: bool = False):
        self.relative = relative
        model.eval().requires_grad_(False)
        model.set_attn_implementation("eager")
        self.base, self.head = model.base_model, model.get_output_embeddings()
        prefix = model.base_model_prefix + "."
        self.tangents: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.head_direction: tuple[torch.Tensor, torch.Tensor | None] | None = None
        for name, p in direction.items():
            linear = model.get_submodule(name)
            if linear is self.head:
                self.head_direction = _weight_and_bias(linear, p)
                continue
            if not name.startswith(prefix):
                raise IfguideError(f"loss-term scores track the LM head and modules inside '{prefix[:-1]}' "
                                   f"only, not '{name}'")
            weight, bias = _weight_and_bias(linear, p)
            local = name[len(prefix):]
            self.tangents[f"{local}.weight"] = (linear.weight, weight)
            if bias is not None:
                self.tangents[f"{local}.bias"] = (linear.bias, bias)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        with forward_ad.dual_level():
            duals = {k: forward_ad.make_dual(value, tangent) for k, (value, tangent) in self.tangents.items()}
            hidden = functional_call(self.base, duals, (ids,)).last_hidden_state[:, :-1]
            h, dh = forward_ad.unpack_dual(hidden)
        # l_t = logsumexp(W h_t + b) - (W h_t + b)[y]: its derivative along dh_t is dh_t . (E_p[W] - W_y)
        weight, targets = self.head.weight, ids[:, 1:]
        probs = torch.softmax(self.head(h).float(), dim=-1)
        hidden_gradient = probs @ weight - weight[targets]
        scores = (dh * hidden_gradient).sum(-1) if dh is not None else torch.zeros(targets.shape,
            device=ids.device)
        # and along (P_W, P_b) at fixed h_t: (p_t - e_y) . (P_W h_t + P_b)
        if self.head_direction is not None:
            head_weight, head_bias = self.head_direction
            moved = F.linear(h, head_weight, head_bias).float()
            scores = scores + (probs * moved).sum(-1) - moved.gather(-1, targets[..., None])[..., 0]
        if self.relative:
            scores = scores / hidden_gradient.norm(dim=-1).clamp(min=1e-12)
        return F.pad(scores, (0, 1))


class KronfluenceScorer:
    """Kronfluence's per-token scores from P: one backward pass through a perturbation eps_t per position."""

    def __init__(self, model: nn.Module, direction: dict[str, torch.Tensor]):
        self.model = model.eval().requires_grad_(False)
        self.directions = [(model.get_submodule(name), *_weight_and_bias(model.get_submodule(name), p))
                           for name, p in direction.items()]

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        eps = torch.zeros(ids.shape, device=ids.device, requires_grad=True)

        def nudge(weight, bias):
            return lambda module, inputs, output: output + eps[..., None] * F.linear(inputs[0], weight, bias)

        handles = [module.register_forward_hook(nudge(w, b)) for module, w, b in self.directions]
        try:
            logits = self.model(input_ids=ids).logits.float()
            loss = F.cross_entropy(logits.transpose(1, 2), next_token_labels(ids), ignore_index=-100,
                                   reduction="sum")
            (grad,) = torch.autograd.grad(loss, eps)
        finally:
            for handle in handles:
                handle.remove()
        return grad


SCORERS: dict[str, Callable[[nn.Module, dict], Callable[[torch.Tensor], torch.Tensor]]] = {
    "loss-term": LossTermScorer, "kronfluence": KronfluenceScorer}


def token_scorer(kind: str, model: nn.Module, direction: dict[str, torch.Tensor], normalize: str = "none"):
    """The per-token scorer of `kind` (loss-term or kronfluence) for model and direction, on the GPU when
    there is one (CPU block ids in, CPU scores out)."""
    if kind not in SCORERS:
        raise IfguideError(f"unknown token score kind '{kind}' (use one of {', '.join(TOKEN_SCORES)})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    direction = {name: p.to(device) for name, p in direction.items()}
    scorer = LossTermScorer(model, direction, relative=True) if normalize == "relative" else \
        SCORERS[kind](model, direction)
    return scorer if device.type == "cpu" else (lambda ids: scorer(ids.to(device)).cpu())


def score_blocks(scorer: Callable[[torch.Tensor], torch.Tensor], blocks: np.ndarray, shard_blocks: int,
                 batch_size: int, start: int = 0, stop: int | None = None,
                 skip: Collection[int] = ()) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first block, scores) shard by shard over blocks[start:stop], scoring `batch_size` blocks at a
    time; shards whose first block is in `skip` (already scored) are left out."""
    stop = len(blocks) if stop is None else stop
    for first in range(start, stop, shard_blocks):
        if first in skip:
            continue
        last = min(first + shard_blocks, stop)
        parts = [scorer(torch.from_numpy(np.array(blocks[i: min(i + batch_size, last)], dtype=np.int64)))
                 for i in range(first, last, batch_size)]
        yield first, torch.cat(parts).numpy()
