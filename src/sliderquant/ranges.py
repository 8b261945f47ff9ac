"""Weight and activation ranges of a layer's projections (paper Figures D–R).

Weights: max - min of every output channel (row). Activations: absmax over channels of
every token at a projection's input (what a per-token activation quantizer must cover).
"""

from __future__ import annotations

import torch

from sliderquant.models.adapters import DecoderAdapter

RANGE_PROJECTIONS = ("q", "down")  # the attention input and the MLP's intermediate


@torch.no_grad()
def weight_ranges(model: torch.nn.Module, layer: int, name: str) -> list[float]:
    """Per-output-channel range (max - min) of projection `name` of `layer`."""
    w = DecoderAdapter(model).linears(layer)[name].weight.float()
    return (w.amax(dim=1) - w.amin(dim=1)).tolist()


@torch.no_grad()
def activation_ranges(model: torch.nn.Module, layers: list[int], ids: torch.Tensor,
                      names: tuple[str, ...] = RANGE_PROJECTIONS) -> dict[tuple[int, str], list]:
    """Per-token absmax at the input of each projection in `names` of each of `layers`, over
    the token windows `ids` [n, T] (n * T values each)."""
    adapter = DecoderAdapter(model)
    found: dict[tuple[int, str], list[float]] = {(i, n): [] for i in layers for n in names}
    hooks = []
    for i in layers:
        for name in names:
            def record(_module, inputs, key=(i, name)):
                found[key] += inputs[0].detach().float().abs().amax(dim=-1).flatten().tolist()
            hooks.append(adapter.linears(i)[name].register_forward_pre_hook(record))
    try:
        device = next(model.parameters()).device
        for row in ids:
            model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return found


def compare(before: torch.nn.Module, after: torch.nn.Module, ids: torch.Tensor
            ) -> dict[int, dict[str, dict[str, tuple[list[float], list[float]]]]]:
    """Weight and activation ranges of the first, a middle and the last layer in `before`
    (the FP model) and `after` (its quantized model), activations over the windows `ids`:
    {layer: {projection: {"weight": (before, after), "activation": (before, after)}}}."""
    L = DecoderAdapter(before).num_layers
    layers = sorted({0, L // 2, L - 1})
    acts = {name: activation_ranges(m, layers, ids)
            for name, m in (("before", before), ("after", after))}
    return {i: {p: {"weight": (weight_ranges(before, i, p), weight_ranges(after, i, p)),
                    "activation": (acts["before"][i, p], acts["after"][i, p])}
                for p in RANGE_PROJECTIONS}
            for i in layers}
