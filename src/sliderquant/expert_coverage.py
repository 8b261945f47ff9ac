"""Expert coverage: how many calibration tokens the full-precision teacher routes to each
expert of every MoE layer, and which experts received too few to be trained on them alone.

Users' most frequent MoE complaint is experts that calibration never reaches (FIELD.md §5).
Here every expert is quantized whatever its coverage (its weight clipping and LoRA start
from round-to-nearest, and the window loss trains whatever it receives); the count shows
where that training rests on little data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sliderquant.quant.layer import QuantDecoderLayer

LOW_COVERAGE_TOKENS = 16  # fewer routed calibration tokens than this: flagged in the report


@dataclass
class ExpertCoverage:
    """Tokens the FP teacher routed to each expert, per MoE layer (model layer index)."""

    tokens: dict[int, list[int]]
    threshold: int = LOW_COVERAGE_TOKENS

    def low(self) -> list[tuple[int, int, int]]:
        """(layer, expert, tokens) of every expert below the threshold."""
        return [(layer, e, n) for layer, counts in self.tokens.items()
                for e, n in enumerate(counts) if n < self.threshold]

    def to_dict(self) -> dict:
        return {"tokens_per_expert": {str(k): v for k, v in self.tokens.items()},
                "low_coverage_threshold": self.threshold,
                "low_coverage": [{"layer": layer, "expert": e, "tokens": n}
                                 for layer, e, n in self.low()],
                "routing": "full-precision teacher (top-k of the FP router on the FP path)"}


@torch.no_grad()
def count_expert_tokens(layers: list[QuantDecoderLayer], x: torch.Tensor,
                        rope: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                        chunk: int, first: int = 0) -> ExpertCoverage:
    """Run the calibration windows `x` [n, T, d] (host; the input of `layers[0]`, model layer
    `first`) through `layers` in full precision, layer by layer, `chunk` windows at a time
    on `device`, counting the tokens each MoE layer routes to each of its experts."""
    cos, sin = (t.to(device) for t in rope)
    tokens: dict[int, list[int]] = {}
    moe_layers = [i for i, layer in enumerate(layers) if layer.moe() is not None]
    last = moe_layers[-1] + 1 if moe_layers else 0
    for index, layer in enumerate(layers[:last], start=first):
        moe = layer.moe()
        counts = None if moe is None else torch.zeros(moe.num_experts, dtype=torch.long)
        out = torch.empty_like(x)
        with layer.placed(device):
            for lo in range(0, x.shape[0], chunk):
                h = layer.feed_forward_input(x[lo:lo + chunk].to(device), cos, sin)
                if moe is not None:
                    _, probs = moe.routing(h)
                    chosen = torch.topk(probs, moe.top_k, dim=-1).indices
                    counts += torch.bincount(chosen.flatten().cpu(), minlength=moe.num_experts)
                out[lo:lo + chunk] = (h + layer.mlp(h)).to(out.dtype).cpu()
        if counts is not None:
            tokens[index] = counts.tolist()
        x = out
    return ExpertCoverage(tokens)
