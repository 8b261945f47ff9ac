"""Under-calibrated MoE experts: does training an expert on the few calibration tokens routed
to it help or hurt, against leaving it at its round-to-nearest start?

Tiny random Qwen3-MoE models (no real MoE checkpoint is reachable offline; see
docs/ARCHITECTURE.md), 8 experts, top-2, random token ids. Per seed: quantize with `rtn` and
with `sliderquant` (same config otherwise), then a third model, "trained, low reset", which is
the trained one with every expert below the low-coverage threshold put back to its RTN
weights. Measured on held-out ids: each expert's relative output error on the tokens the FP
router sends it (FP inputs, so only the expert's own weights differ), averaged over the
experts below / above the threshold, and the model's KL(FP || quantized) per token.

    OMP_NUM_THREADS=1 python benchmarks/expert_coverage.py   # writes docs/results/expert_coverage.*
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as tf

from sliderquant import QuantConfig, quantize
from sliderquant.atomic import write_text
from sliderquant.expert_coverage import LOW_COVERAGE_TOKENS
from sliderquant.models.adapters import DecoderAdapter
from sliderquant.quant.layer import LayerQuantSpec, QuantDecoderLayer

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
EXPERTS, TOP_K, VOCAB = 8, 2, 256


def tiny_qwen3_moe(seed: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tf.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=True,
        max_position_embeddings=256, rms_norm_eps=1e-6, use_sliding_window=False)
    model = tf.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):  # decisive, uneven routing
                p.copy_(0.5 * torch.randn_like(p))
    return model.float().eval()


def expert_weights(model, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    experts = DecoderAdapter(model).experts_module(layer)
    return experts.gate_up_proj[e], experts.down_proj[e]


def swiglu(h: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(h, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


@torch.no_grad()
def expert_errors(fp, variants: dict, ids: torch.Tensor) -> dict[str, dict[tuple, float]]:
    """Per variant, (layer, expert) -> relative output error on the held-out tokens the FP
    router sends to that expert, with FP inputs."""
    adapter = DecoderAdapter(fp)
    spec = LayerQuantSpec(wbits=16, abits=16, lora_rank=0, lwc=False)
    views = [QuantDecoderLayer(adapter.parts(i), spec) for i in range(adapter.num_layers)]
    x = adapter.embed(ids)
    cos, sin = adapter.rotary(x, ids.shape[1])
    errors: dict[str, dict[tuple, float]] = {name: {} for name in variants}
    for i, view in enumerate(views):
        h_in = view.feed_forward_input(x, cos, sin)
        h, probs = view.moe().routing(h_in)
        chosen = torch.topk(probs, TOP_K, dim=-1).indices
        for e in range(EXPERTS):
            tokens = (chosen == e).any(-1)
            if not tokens.any():
                continue
            want = swiglu(h[tokens], *expert_weights(fp, i, e))
            for name, model in variants.items():
                got = swiglu(h[tokens], *expert_weights(model, i, e))
                errors[name][(i, e)] = float((got - want).norm() ** 2 / want.norm() ** 2)
        x = h_in + view.mlp(h_in)
    return errors


@torch.no_grad()
def kl_per_token(fp, model, ids: torch.Tensor) -> float:
    p = F.log_softmax(fp(ids).logits.double(), -1)
    q = F.log_softmax(model(ids).logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def one_seed(seed: int, args) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    calib = torch.randint(0, VOCAB, (args.nsamples, args.seqlen), generator=g)
    held_out = torch.randint(0, VOCAB, (32, args.seqlen), generator=g)
    common = dict(wbits=args.wbits, abits=16, nsamples=args.nsamples, seqlen=args.seqlen,
                  batch_size=2, shallow=1, deep=1, seed=seed)
    fp = tiny_qwen3_moe(seed, args.layers)
    rtn = quantize(tiny_qwen3_moe(seed, args.layers), None, QuantConfig.from_preset(
        f"w{args.wbits}a16", True, method="rtn", lwc=False, lora_rank=0, **common), calib=calib,
        device="cpu", show_progress=False).model
    trained = quantize(tiny_qwen3_moe(seed, args.layers), None, QuantConfig.from_preset(
        f"w{args.wbits}a16", True, epochs=args.epochs, **common), calib=calib, device="cpu",
        show_progress=False)
    counts = {int(k): v for k, v in trained.report["experts"]["tokens_per_expert"].items()}
    low = {(i, e) for i, row in counts.items() for e, n in enumerate(row)
           if n < LOW_COVERAGE_TOKENS}
    reset = copy.deepcopy(trained.model)
    with torch.no_grad():
        for i, e in low:
            for mine, theirs in zip(expert_weights(reset, i, e), expert_weights(rtn, i, e),
                                    strict=True):
                mine.copy_(theirs)
    variants = {"rtn": rtn, "trained": trained.model, "trained, low reset": reset}
    errors = expert_errors(fp, variants, held_out)
    out = {"seed": seed, "tokens_per_expert": counts, "low": sorted(low), "buckets": {}}
    for bucket, members in (("low", low), ("covered", set(errors["rtn"]) - low)):
        keys = [k for k in members if k in errors["rtn"]]
        out["buckets"][bucket] = {
            "experts": len(keys),
            **{name: sum(errors[name][k] for k in keys) / max(len(keys), 1)
               for name in variants}}
    out["kl"] = {name: kl_per_token(fp, model, held_out) for name, model in variants.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--wbits", type=int, default=3)
    parser.add_argument("--nsamples", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    began = time.process_time()
    runs = [one_seed(seed, args) for seed in range(args.seeds)]
    record = {"_meta": {"command": "OMP_NUM_THREADS=1 python benchmarks/expert_coverage.py",
                        "args": vars(args), "threshold": LOW_COVERAGE_TOKENS,
                        "machine": platform.platform(), "torch": torch.__version__,
                        "transformers": tf.__version__,
                        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
                        "cpu_seconds": round(time.process_time() - began, 1)},
              "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / "expert_coverage.json", json.dumps(record, indent=1))
    write_text(RESULTS / "expert_coverage.md", markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    meta = record["_meta"]
    a = meta["args"]
    lines = [
        "# Under-calibrated MoE experts: trained on what they received vs reset to RTN",
        "",
        f"`{meta['command']}` ({meta['date']}, {meta['machine']}, torch {meta['torch']}, "
        f"transformers {meta['transformers']}, {meta['cpu_seconds']} CPU s). Tiny random "
        f"Qwen3-MoE ({a['layers']} layers, {EXPERTS} experts, top-{TOP_K}, hidden 64), "
        f"W{a['wbits']}A16 per channel (the --fast preset's learning rates), "
        f"{a['nsamples']}x{a['seqlen']} random calibration ids, "
        f"{a['epochs']} epochs per window; held-out: 32x{a['seqlen']} random ids. Low = fewer "
        f"than {meta['threshold']} calibration tokens routed to the expert.",
        "",
        "Mean relative output error of an expert on the held-out tokens the FP router sends "
        "it (FP inputs), and the model's KL(FP || quantized) per token:",
        "",
        "| seed | bucket | experts | RTN | trained | trained, low reset |",
        "|---|---|---|---|---|---|",
    ]
    for run in record["runs"]:
        for bucket, b in run["buckets"].items():
            lines.append(f"| {run['seed']} | {bucket} | {b['experts']} | {b['rtn']:.4f} | "
                         f"{b['trained']:.4f} | {b['trained, low reset']:.4f} |")
        kl = run["kl"]
        lines.append(f"| {run['seed']} | KL model | | {kl['rtn']:.6f} | {kl['trained']:.6f} | "
                     f"{kl['trained, low reset']:.6f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
