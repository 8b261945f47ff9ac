"""Offline residual-stream rotation for W4A4 (ALGORITHM.md §3.2), merged into the weights.

Norm gains are fused into the following linears, the embedding rows are optionally centred
(inherited from QuaRot; not exactly function-preserving for RMSNorm models), and a random
Hadamard matrix Q rotates the residual stream: inputs of q/k/v/up/gate and lm_head by Q,
outputs of o/down and the embeddings by Qᵀ. No online transform: zero inference cost.
"""

from __future__ import annotations

import torch
from torch import nn

from sliderquant.models.adapters import DecoderAdapter
from sliderquant.quant.linear import Projection


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of order n (float64), or None if none is constructible here.

    Sylvester doubling of a Paley matrix: Paley I for a prime q ≡ 3 (mod 4) gives order
    q + 1, Paley II for a prime q ≡ 1 (mod 4) gives order 2(q + 1). This covers the common
    widths (e.g. 576 = 72·8, 896 = 28·32, 3584 = 28·128, 5120 = 20·256).
    """
    m, doublings = n, 0
    while m >= 1:
        core = _paley(m)
        if core is not None:
            h = core
            for _ in range(doublings):
                h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
            return h
        if m % 2:
            return None
        m, doublings = m // 2, doublings + 1
    return None


def random_orthogonal(n: int, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """(Q, kind): diag(random ±1)·H/√n if a Hadamard of order n exists, else a random
    orthogonal matrix from the QR decomposition of a Gaussian matrix."""
    h = hadamard_matrix(n)
    if h is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r)), "random_orthogonal"
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return signs[:, None] * h / n**0.5, "random_hadamard"


@torch.no_grad()
def rotate_model(adapter: DecoderAdapter, seed: int, center_embeddings: bool = True) -> str:
    """Fuse norms and rotate the residual stream of `adapter.model` in place; returns the
    kind of matrix used ("random_hadamard" or "random_orthogonal").

    Every block's pre-norm is fused into the projections that read the residual stream
    (`reads()` of its parts: q/k/v, gate/up, an MoE router and every expert's gate/up); those
    take Q on their inputs, the ones that write it back (`writes()`: o, down, every expert's
    down) take Qᵀ on their outputs. Fused expert parameters are rotated expert by expert,
    in place.
    """
    model = adapter.model
    if adapter.lm_head.weight is adapter.embed.weight or getattr(
            model.config, "tie_word_embeddings", False):
        adapter.lm_head.weight = nn.Parameter(adapter.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    layers = [adapter.parts(i) for i in range(adapter.num_layers)]
    for parts in layers:
        for block in parts.blocks().values():
            _fuse_norm(block.norm, [p.weight for p in block.reads()])
    _fuse_norm(adapter.final_norm.weight, [adapter.lm_head.weight])

    generator = torch.Generator().manual_seed(seed)
    q, kind = random_orthogonal(adapter.hidden_size, generator)
    embed = adapter.embed.weight
    e = embed.double()
    if center_embeddings:
        e = e - e.mean(dim=-1, keepdim=True)
    embed.copy_((e @ q).to(embed.dtype))
    _rotate_inputs(adapter.lm_head.weight, q)
    for parts in layers:
        for block in parts.blocks().values():
            for proj in block.reads():
                _rotate_inputs(proj.weight, q)
            for proj in block.writes():
                _rotate_outputs(proj, q)
    return kind


def _fuse_norm(gain: torch.Tensor, weights: list[torch.Tensor]) -> None:
    g = gain.double()
    for w in weights:
        w.copy_((w.double() * g).to(w.dtype))
    gain.fill_(1.0)


def _rotate_inputs(weight: torch.Tensor, q: torch.Tensor) -> None:
    weight.copy_((weight.double() @ q).to(weight.dtype))


def _rotate_outputs(proj: Projection, q: torch.Tensor) -> None:
    proj.weight.copy_((q.T @ proj.weight.double()).to(proj.weight.dtype))
    if proj.bias is not None:
        proj.bias.copy_((proj.bias.double() @ q).to(proj.bias.dtype))


def _paley(m: int) -> torch.Tensor | None:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    q = m - 1
    if q % 4 == 3 and _is_prime(q):
        jac = _jacobsthal(q)
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
        return s + torch.eye(m, dtype=torch.float64)
    if m % 2 == 0:
        q = m // 2 - 1
        if q % 4 == 1 and _is_prime(q):
            c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
            a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def _jacobsthal(q: int) -> torch.Tensor:
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)],
                       dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))
