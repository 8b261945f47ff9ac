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
    kind of matrix used ("random_hadamard" or "random_orthogonal")."""
    model = adapter.model
    if adapter.lm_head.weight is adapter.embed.weight or getattr(
            model.config, "tie_word_embeddings", False):
        adapter.lm_head.weight = nn.Parameter(adapter.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    for i in range(adapter.num_layers):
        parts = adapter.parts(i)
        _fuse_norm(parts.input_norm, [parts.linears[n] for n in ("q", "k", "v")])
        _fuse_norm(parts.post_norm, [parts.linears[n] for n in ("up", "gate")])
    _fuse_norm(adapter.final_norm, [adapter.lm_head])

    generator = torch.Generator().manual_seed(seed)
    q, kind = random_orthogonal(adapter.hidden_size, generator)
    embed = adapter.embed.weight
    e = embed.double()
    if center_embeddings:
        e = e - e.mean(dim=-1, keepdim=True)
    embed.copy_((e @ q).to(embed.dtype))
    _rotate_inputs(adapter.lm_head, q)
    for i in range(adapter.num_layers):
        lin = adapter.parts(i).linears
        for name in ("q", "k", "v", "up", "gate"):
            _rotate_inputs(lin[name], q)
        for name in ("o", "down"):
            _rotate_outputs(lin[name], q)
    return kind


def _fuse_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    gain = norm.weight.double()
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * gain).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


def _rotate_inputs(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.copy_((lin.weight.double() @ q).to(lin.weight.dtype))


def _rotate_outputs(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.copy_((q.T @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ q).to(lin.bias.dtype))


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
