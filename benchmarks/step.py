"""The cost of a training step: a plain fp32 step against sliderquant's quantized step.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/step.py --data-dir DATA \\
        [--recipe LABEL='FLAGS' ...] [--reps 3] [--steps 8]

Two decoder layers of SmolLM2-135M and the same 2 x 512 calibration tokens (wikitext2:valid),
one thread, CPU seconds (`time.process_time`), everything in one process and interleaved
(each repetition times the plain step and every recipe once, so load drift hits all alike).

- plain: the two transformers decoder layers with every weight trainable, their own forward,
  MSE against a fixed target, backward, AdamW step.
- quantized (per recipe): `sliderquant.quantize` on a copy of the model cut to those two
  layers, with the recipe's flags plus one window over both layers (`--schedule 0-1`), one
  intra-layer stage (every weight quantized at full rate) and 2 x 512 calibration tokens in
  batches of 2, so one epoch is one optimiser step. The call is timed with 1 and with 1 + N
  epochs; the difference over N is the cost of one step, without the one-off parts (capture,
  FP targets, optimiser set-up, folding). Only public API and the CLI's flag vocabulary are
  used, so the measurement survives the restructuring of quant/.

The profile (torch.profiler, CPU) of the same runs gives the self CPU time per step of each
operator, quantized minus plain: where the difference goes. Writes docs/results/step.json
and docs/results/step.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import date
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from duel import add_recipe_argument, config_from_flags, load_average, src_commit  # noqa: E402 (no package)

import sliderquant  # noqa: E402
from sliderquant.api import calibration_ids  # noqa: E402
from sliderquant.atomic import write_text  # noqa: E402
from sliderquant.config import QuantConfig  # noqa: E402
from sliderquant.data import resolve_data_root  # noqa: E402

RESULTS = HERE.parent / "docs" / "results"
MODEL = "smollm2-135m"
LAYERS, TOKENS, SEQLEN = 2, 2, 512
STEP_FLAGS = ["--schedule", "0-1", "--intra-stages", "1", "--nsamples", str(TOKENS),
              "--seqlen", str(SEQLEN), "--batch-size", str(TOKENS)]
DEFAULT_RECIPES = {
    "W4A16": "--preset w4a16 --fast",
    "W2A16 g64": "--preset w2a16 --fast --group-size 64 --paper",
    "W4A4 + channel scaling": "--preset w4a4 --fast --no-rotate",
    "W2A16 g64 + learned rounding": "--preset w2a16 --fast --group-size 64 --paper --rounding",
}
TOP_OPS = 12


def two_layer_model(data_dir: str):
    """SmolLM2 cut to its first LAYERS decoder layers (sdpa attention, as ours), tokenizer."""
    loaded = sliderquant.load(MODEL, data_dir)
    model = loaded.model.eval()
    model.model.layers = model.model.layers[:LAYERS]
    model.config.num_hidden_layers = LAYERS
    model.config._attn_implementation = "sdpa"
    return model, loaded.tokenizer


class PlainStep:
    """A plain fp32 training step of the model's decoder layers, all weights trainable."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor):
        self.layers = copy.deepcopy(model.model.layers).train()
        for p in self.layers.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            self.x = model.model.embed_tokens(ids)
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
            self.rope = model.model.rotary_emb(self.x, positions)
            self.target = self.forward() + 0.01 * torch.randn_like(self.x)
        self.optimizer = torch.optim.AdamW(self.layers.parameters(), lr=1e-5, weight_decay=0.0)

    def forward(self) -> torch.Tensor:
        h = self.x
        for layer in self.layers:
            out = layer(h, attention_mask=None, position_embeddings=self.rope, use_cache=False)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def __call__(self, steps: int) -> None:
        for _ in range(steps):
            loss = F.mse_loss(self.forward(), self.target)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


def quantize_once(model, tokenizer, ids, flags: list[str], epochs: int) -> None:
    config = config_from_flags([*flags, *STEP_FLAGS, "--epochs", str(epochs)])
    sliderquant.quantize(copy.deepcopy(model), tokenizer, config, calib=ids, device="cpu",
                         show_progress=False)


def cpu_seconds(fn) -> float:
    began = time.process_time()
    fn()
    return time.process_time() - began


def op_times(fn) -> dict[str, float]:
    """Self CPU seconds per operator of one call of `fn`, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}


def per_step_ops(hi: dict[str, float], lo: dict[str, float], steps: int) -> dict[str, float]:
    return {k: (hi.get(k, 0.0) - lo.get(k, 0.0)) / steps for k in set(hi) | set(lo)}


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tokenizer = two_layer_model(args.data_dir)
    config = QuantConfig.from_preset("w4a16", fast=True, calib="wikitext2:valid",
                                     nsamples=TOKENS, seqlen=SEQLEN)
    ids = calibration_ids(tokenizer, config, resolve_data_root(args.data_dir))
    plain = PlainStep(model, ids)
    recipes = {label: shlex.split(flags) for label, flags in args.recipes.items()}
    for flags in recipes.values():  # warm-up: first calls pay for lazy initialisation
        quantize_once(model, tokenizer, ids, flags, 1)
    plain(1)
    n = args.steps
    plain_s: list[float] = []
    quant_s: dict[str, list[float]] = {label: [] for label in recipes}
    for rep in range(args.reps):
        plain_s.append(cpu_seconds(lambda: plain(n)) / n)
        for label, flags in recipes.items():
            lo = cpu_seconds(lambda f=flags: quantize_once(model, tokenizer, ids, f, 1))
            hi = cpu_seconds(lambda f=flags: quantize_once(model, tokenizer, ids, f, 1 + n))
            quant_s[label].append((hi - lo) / n)
        print(f"rep {rep + 1}/{args.reps}: plain {plain_s[-1]:.3f} s/step, "
              + ", ".join(f"{k} {v[-1]:.3f}" for k, v in quant_s.items()), flush=True)
    plain_ops = {k: v / n for k, v in op_times(lambda: plain(n)).items()}
    records = []
    base = statistics.median(plain_s)
    for label, flags in recipes.items():
        hi = op_times(lambda f=flags: quantize_once(model, tokenizer, ids, f, 1 + n))
        lo = op_times(lambda f=flags: quantize_once(model, tokenizer, ids, f, 1))
        ops = per_step_ops(hi, lo, n)
        step = statistics.median(quant_s[label])
        diff = sorted(((k, ops.get(k, 0.0), plain_ops.get(k, 0.0))
                       for k in set(ops) | set(plain_ops)),
                      key=lambda t: t[1] - t[2], reverse=True)
        records.append({
            "recipe": label, "flags": [*flags, *STEP_FLAGS], "step_cpu_s": round(step, 4),
            "step_cpu_s_reps": [round(s, 4) for s in quant_s[label]],
            "ratio": round(step / base, 3),
            "top_ops": [{"op": k, "self_cpu_s": round(v, 5)} for k, v in
                        sorted(ops.items(), key=lambda t: t[1], reverse=True)[:TOP_OPS]],
            "extra_ops": [{"op": k, "quantized_s": round(q, 5), "plain_s": round(p, 5),
                           "extra_s": round(q - p, 5)} for k, q, p in diff[:TOP_OPS]],
        })
    return {
        "date": date.today().isoformat(), "commit": src_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python "
                   f"{platform.python_version()}",
        "versions": {d: version(d) for d in ("sliderquant", "torch", "transformers")},
        "threads": torch.get_num_threads(), "load_after": load_average(),
        "command": "PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/step.py "
                   + " ".join(f"--recipe {shlex.quote(f'{k}={v}')}"
                              for k, v in args.recipes.items())
                   + f" --reps {args.reps} --steps {n} --data-dir DATA",
        "tokens": f"{TOKENS} x {SEQLEN} of wikitext2:valid", "layers": LAYERS,
        "plain_step_cpu_s": round(base, 4), "plain_step_cpu_s_reps": [round(s, 4) for s in plain_s],
        "plain_top_ops": [{"op": k, "self_cpu_s": round(v, 5)} for k, v in
                          sorted(plain_ops.items(), key=lambda t: t[1], reverse=True)[:TOP_OPS]],
        "recipes": records,
    }


def write_markdown(result: dict) -> Path:
    lines = ["| recipe | CPU s per step | plain fp32 step | ratio | reps (s) |",
             "|---|---|---|---|---|"]
    for r in result["recipes"]:
        reps = ", ".join(f"{s:.3f}" for s in r["step_cpu_s_reps"])
        lines.append(f"| {r['recipe']} | {r['step_cpu_s']:.3f} | "
                     f"{result['plain_step_cpu_s']:.3f} | {r['ratio']:.2f}x | {reps} |")
    lines += ["", "Where the extra time goes: torch.profiler's self time per step and operator, "
              "quantized minus plain. The profiler clocks operators in wall time, so on a "
              "loaded machine its seconds are larger than the CPU seconds above (and its own "
              "overhead inflates small operators): read them as shares, not as costs.", ""]
    for r in result["recipes"]:
        lines += [f"**{r['recipe']}** (`{' '.join(r['flags'])}`)", "",
                  "| operator | quantized s | plain s | extra s |", "|---|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['quantized_s']:.4f} | {o['plain_s']:.4f} | "
                  f"{o['extra_s']:+.4f} |" for o in r["extra_ops"]]
        lines.append("")
    lines += [
        f"Plain step: {result['layers']} transformers decoder layers of SmolLM2-135M, every "
        "weight trainable, forward + MSE + backward + AdamW. Quantized step: "
        "`sliderquant.quantize` over the same layers and tokens, timed with 1 and 1 + N "
        "epochs of one step each, difference over N. Tokens: " + result["tokens"] + ".",
        f"Command: `{result['command']}`. Commit of src/: {result['commit']}. "
        f"Machine: {result['machine']}, {result['threads']} thread, shared (load after "
        f"{result['load_after']}). Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
        + f". Date: {result['date']}.",
    ]
    path = RESULTS / "step.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    add_recipe_argument(ap, DEFAULT_RECIPES)
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    ap.add_argument("--steps", type=int, default=8, help="optimiser steps per timing (N)")
    ap.add_argument("--table", action="store_true", help="only rewrite step.md from step.json")
    args = ap.parse_args()
    path = RESULTS / "step.json"
    if args.table:
        write_markdown(json.loads(path.read_text()))
        return 0
    args.recipes = dict(args.recipe) if args.recipe else DEFAULT_RECIPES
    result = measure(args)
    write_text(path, json.dumps(result, indent=1))
    print(write_markdown(result).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
