"""Layer sensitivity: how much perplexity each layer costs when quantized (paper Figure 1).

Two scans, each against the FP model: (a) *per layer* — quantize layer i alone, every
other layer in full precision; (b) *prefix* — quantize the first l layers, l = 1..L. For
every measurement the number of layers whose projections really differ from FP (changed
weights or an activation quantizer in front) is counted, not assumed.

Methods: `rtn` rounds the layer's weights to nearest (per output channel or group) and,
for abits < 16, puts the deploy-time per-token activation quantizers in front of its
projections and q/k/v (quant/runtime.py); cheap, one evaluation per measurement. A trained
method (`sliderquant`, `fixed`, `blockwise`) runs the engine on just the quantized span,
with calibration data, then folds it: one training per measurement, so the prefix scan
costs O(L²) layer trainings.

`suggest_depths` turns a per-layer scan into a `shallow`/`deep` setting (ALGORITHM.md §6).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from sliderquant.allocation import Option, budget_bits, solve, storage_bits
from sliderquant.calibration import calibration_ids
from sliderquant.config import ConfigError, QuantConfig
from sliderquant.data import resolve_data_root
from sliderquant.eval.perplexity import eval_windows, perplexity_from_nlls, window_nlls
from sliderquant.models.adapters import DecoderAdapter
from sliderquant.quant.layer import QuantDecoderLayer
from sliderquant.quant.learnables import LayerQuantSpec
from sliderquant.quant.quantizer import WeightFormat, fake_quantize, fake_quantize_weight
from sliderquant.quant.runtime import (
    ActQuantLinear,
    quantize_router_input,
    register_attention,
    register_experts,
)
from sliderquant.span import embed, quantize_span
from sliderquant.version import __version__

DEFAULT_THRESHOLD = 2.0  # k in suggest_depths: "sensitive" = k x the median middle-layer cost

Progress = Callable[[str, int, int], None]  # (what, measurements done, measurements total)


@dataclass
class Scan:
    """One method's measurements; index i of `per_layer` is layer i, of `prefix` l = i + 1."""

    method: str
    per_layer: list[float] = field(default_factory=list)
    per_layer_quantized: list[int] = field(default_factory=list)
    prefix: list[float] = field(default_factory=list)
    prefix_quantized: list[int] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Suggestion:
    shallow: int
    deep: int
    threshold: float  # ppl increase above which a layer counts as sensitive
    reasoning: str


class LayerQuantizer:
    """Quantizes spans of a model's layers in place and puts them back exactly."""

    def __init__(self, model: torch.nn.Module, config: QuantConfig,
                 calib: torch.Tensor | None = None):
        self.adapter = DecoderAdapter(model)
        self.config = config
        self.calib = calib
        self.device = next(model.parameters()).device
        if config.trains and calib is None:
            raise ValueError(f"method {config.method} trains: it needs calibration ids")
        for p in model.parameters():
            p.requires_grad_(False)
        self._fp = [self._signature(i) for i in range(self.adapter.num_layers)]
        self._attn = model.config._attn_implementation
        self._moe = any(self.adapter.is_moe(i) for i in range(self.adapter.num_layers))
        self._experts = getattr(model.config, "_experts_implementation", None)

    def __enter__(self) -> LayerQuantizer:
        if self.config.abits < 16:
            self.adapter.model.set_attn_implementation(register_attention())
            if self._moe:  # experts without `sliderquant_abits` run unquantized
                self.adapter.model.set_experts_implementation(register_experts())
        return self

    def __exit__(self, *exc) -> None:
        self.adapter.model.set_attn_implementation(self._attn)
        if self._moe and self.config.abits < 16 and self._experts:
            self.adapter.model.set_experts_implementation(self._experts)

    def quantize(self, first: int, last: int) -> Callable[[], None]:
        """Quantize layers first..last (inclusive); returns the function that restores them."""
        span = range(first, last + 1)
        params = [(p, p.detach().clone()) for i in span
                  for p in self.adapter.layers[i].parameters()]
        linears = [(i, name, lin) for i in span
                   for name, lin in self.adapter.linears(i).items()]
        if self.config.trains:
            quantize_span(self.adapter, self.config, self.calib, self.device, first, last,
                          show_progress=False)
        for i in range(first, last + 1):
            if not self.config.trains:
                self._round(i)
            if self.config.abits < 16:
                self._quantize_activations(i)

        @torch.no_grad()
        def restore() -> None:
            for p, value in params:
                p.copy_(value)
            for i, name, lin in linears:
                self.adapter.set_linear(i, name, lin)
            for i in span:
                for module in (self.adapter.attention_module(i),
                               self.adapter.experts_module(i), self.adapter.router_module(i)):
                    if module is not None and hasattr(module, "sliderquant_abits"):
                        module.sliderquant_abits = 16  # (a router's input hook stays, idle)

        return restore

    def quantized_layers(self) -> int:
        """How many layers differ from FP right now (weights changed or activations quantized)."""
        return sum(self._signature(i) != fp for i, fp in enumerate(self._fp))

    # ---- internals ------------------------------------------------------------------------
    def _signature(self, i: int) -> tuple:
        linears = self.adapter.linears(i).values()
        return (tuple(getattr(lin, "abits", 16) for lin in linears),
                getattr(self.adapter.attention_module(i), "sliderquant_abits", 16),
                tuple(lin.weight.double().sum().item() for lin in linears),
                tuple(lin.weight.double().abs().sum().item() for lin in linears))

    @torch.no_grad()
    def _round(self, i: int) -> None:
        cfg = self.config
        for block in self.adapter.parts(i).blocks().values():
            projections = list(block.proj.values())
            if getattr(block, "router", None) is not None and cfg.quantize_router:
                projections.append(block.router)
            for proj in projections:
                proj.weight.copy_(fake_quantize(proj.weight, cfg.wbits, group_size=cfg.group_size,
                                                symmetric=cfg.symmetric))

    def _quantize_activations(self, i: int) -> None:
        """One layer's deploy-time per-token quantizers (as install_activation_quantization)."""
        for name, lin in self.adapter.linears(i).items():
            self.adapter.set_linear(i, name, ActQuantLinear(lin, self.config.abits))
        if self.config.quantize_attention:
            self.adapter.attention_module(i).sliderquant_abits = self.config.abits
        if self.adapter.is_moe(i):
            self.adapter.experts_module(i).sliderquant_abits = self.config.abits
            if self.config.quantize_router:
                quantize_router_input(self.adapter.router_module(i), self.config.abits)


def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    return perplexity_from_nlls(window_nlls(model, windows, show_progress=False))


def scan(
    model: torch.nn.Module,
    windows: torch.Tensor,
    config: QuantConfig,
    calib: torch.Tensor | None = None,
    prefix: bool = True,
    progress: Progress | None = None,
) -> Scan:
    """The per-layer scan and (with `prefix`) the prefix scan of one method, perplexity on
    `windows` [n, T], on the model's device. The model is returned to its FP weights
    afterwards."""
    began = time.perf_counter()
    result = Scan(config.method)
    with LayerQuantizer(model, config, calib) as q:
        L = q.adapter.num_layers
        total = L + (L if prefix else 0)
        for i in range(L):
            restore = q.quantize(i, i)
            result.per_layer.append(perplexity(model, windows))
            result.per_layer_quantized.append(q.quantized_layers())
            restore()
            if progress:
                progress(config.method, i + 1, total)
        restores: list[Callable[[], None]] = []
        for n in range(1, L + 1) if prefix else ():
            if config.trains:  # a trained method optimises the whole prefix jointly
                for undo in restores:
                    undo()
                restores = [q.quantize(0, n - 1)]
            else:  # rounding is per layer: grow the prefix by one
                restores.append(q.quantize(n - 1, n - 1))
            result.prefix.append(perplexity(model, windows))
            result.prefix_quantized.append(q.quantized_layers())
            if progress:
                progress(config.method, L + n, total)
        for undo in reversed(restores):
            undo()
    result.seconds = round(time.perf_counter() - began, 1)
    return result


def suggest_depths(per_layer_ppl: list[float], fp_ppl: float,
                   k: float = DEFAULT_THRESHOLD) -> Suggestion:
    """`shallow`/`deep` from a per-layer scan.

    Rule: the cost of layer i is c_i = ppl_i - ppl_FP. The reference m is the median cost
    of the middle half of the layers (L//4 .. L - L//4 - 1), floored at 1e-3 x ppl_FP so
    that a model whose middle layers cost nothing does not mark every layer sensitive. A
    layer is *sensitive* when c_i > k * m. `shallow` = 1 + the index of the deepest
    sensitive layer in the first half, `deep` = L - the index of the shallowest sensitive
    layer in the second half (so the growing / shrinking windows cover every sensitive
    layer at the ends), each 1 when there is none and at most max(L//2 - 1, 1).
    """
    L = len(per_layer_ppl)
    cost = [p - fp_ppl for p in per_layer_ppl]
    middle = cost[L // 4: L - L // 4] or cost
    m = max(statistics.median(middle), 1e-3 * fp_ppl)
    threshold = k * m
    sensitive = [i for i, c in enumerate(cost) if c > threshold]
    cap = max(L // 2 - 1, 1)
    head = [i for i in sensitive if i < L // 2]
    tail = [i for i in sensitive if i >= L // 2]
    shallow = min(max(head) + 1 if head else 1, cap)
    deep = min(L - min(tail) if tail else 1, cap)
    names = lambda ids: ", ".join(f"{i} (+{cost[i]:.3g})" for i in ids) or "none"  # noqa: E731
    reasoning = (
        f"FP ppl {fp_ppl:.4g}; median ppl increase of the middle layers {L // 4}.."
        f"{L - L // 4 - 1}: {statistics.median(middle):.3g}; a layer is sensitive above "
        f"{k:g} x {m:.3g} = {threshold:.3g}. Sensitive layers in the first half: "
        f"{names(head)}; in the second half: {names(tail)}. So shallow = {shallow} (growing "
        f"windows over layers 0..{shallow - 1}) and deep = {deep} (shrinking windows over "
        f"layers {L - deep}..{L - 1}), each within [1, {cap}].")
    return Suggestion(shallow, deep, threshold, reasoning)


AUTO_WINDOWS = 4  # calibration windows the `--schedule auto` scan measures perplexity on


def resolve_auto_schedule(model: torch.nn.Module, config: QuantConfig,
                          calib: torch.Tensor) -> tuple[QuantConfig, dict]:
    """`config` with `schedule: auto` replaced by the suggested `shallow`/`deep`, and the
    record of the choice. The scan is RTN at the config's bits on the first AUTO_WINDOWS
    calibration windows (never evaluation data)."""
    rtn = QuantConfig.from_dict({**config.to_dict(), "method": "rtn", "schedule": None})
    windows = calib[:AUTO_WINDOWS]
    began = time.perf_counter()
    fp = perplexity(model, windows)
    result = scan(model, windows, rtn, prefix=False)
    choice = suggest_depths(result.per_layer, fp)
    resolved = QuantConfig.from_dict({**config.to_dict(), "schedule": None,
                                      "shallow": choice.shallow, "deep": choice.deep})
    record = {"shallow": choice.shallow, "deep": choice.deep, "threshold": choice.threshold,
              "k": DEFAULT_THRESHOLD, "reasoning": choice.reasoning, "fp_ppl": fp,
              "per_layer_ppl": result.per_layer, "windows": int(windows.shape[0]),
              "seqlen": int(windows.shape[1]), "method": "rtn",
              "seconds": round(time.perf_counter() - began, 1)}
    return resolved, record


def analyse(
    model: torch.nn.Module,
    tokenizer,
    configs: list[QuantConfig],
    dataset: str = "wikitext2",
    seqlen: int = 512,
    max_windows: int | None = 4,
    data_dir: str | os.PathLike | None = None,
    prefix: bool = True,
    k: float = DEFAULT_THRESHOLD,
    progress: Progress | None = None,
) -> dict:
    """Layer sensitivity scans, one per config (method), on the first `max_windows`
    `seqlen`-token windows of `dataset`, plus the shallow/deep suggestion from the first
    config's per-layer scan, on the model's device. The model ends with its FP weights.

    `progress(what, done, total)` is called after the FP evaluation and every measurement.
    """
    data_root = resolve_data_root(data_dir)
    adapter = DecoderAdapter(model)
    adapter.check_context(seqlen)
    for config in configs:
        adapter.check_group_size(config.group_size)
    began = time.perf_counter()
    windows = eval_windows(dataset, tokenizer, seqlen, max_windows, data_root)
    per_scan = adapter.num_layers * (2 if prefix else 1)
    total = 1 + per_scan * len(configs)
    fp = perplexity(model, windows)
    if progress:
        progress("FP", 1, total)
    scans = {}
    for n, config in enumerate(configs):
        calib = calibration_ids(tokenizer, config, data_root) if config.trains else None
        offset = 1 + n * per_scan
        scans[config.method] = asdict(scan(
            model, windows, config, calib, prefix,
            progress and (lambda what, done, _, o=offset: progress(what, o + done, total))))
    first = configs[0]
    choice = suggest_depths(scans[first.method]["per_layer"], fp, k)
    return {
        "sliderquant_version": __version__,
        "wbits": first.wbits, "abits": first.abits, "group_size": first.group_size,
        "quantize_attention": first.quantize_attention,
        "dataset": dataset, "seqlen": seqlen, "windows": int(windows.shape[0]),
        "num_layers": adapter.num_layers, "fp_ppl": fp,
        "configs": {c.method: c.to_dict() for c in configs},
        "scans": scans,
        "suggestion": {"method": first.method, "k": k, **asdict(choice)},
        "seconds": round(time.perf_counter() - began, 1),
        "torch_threads": torch.get_num_threads(),
    }


# ---- mixed precision: unit scans and the allocation (docs/MIXED.md) -------------------------

# The channel unit's choices: the fraction of every projection's output channels (rows) of a
# layer that get the higher width (the paper's {2, 5, 10, 15, 20} %, plus none and more).
CHANNEL_RATIOS = (0.0, 0.02, 0.05, 0.10, 0.15, 0.20, 0.30, 0.50)


@dataclass
class UnitOptions:
    """One allocation unit (a layer, a projection, or a layer's channel split) and its
    options: per option, the format of each of the unit's projections and what it stores."""

    name: str
    layer: int
    labels: list[str]
    formats: list[dict[str, WeightFormat]]
    costs: list[int]


@dataclass
class Allocation:
    """The resolved allocation: the weight format of every projection (by layer, then
    projection name), and the record of how it was chosen (`sliderquant.json`)."""

    formats: dict[int, dict[str, WeightFormat]]
    record: dict

    def fingerprint(self) -> str:
        """A hash of the formats (part of a run's resume fingerprint)."""
        text = json.dumps({str(i): {name: [f.bits, f.group_size, f.symmetric, f.high_bits,
                                           list(f.high_rows)] for name, f in sorted(p.items())}
                           for i, p in sorted(self.formats.items())})
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _shapes(adapter: DecoderAdapter) -> list[dict[str, tuple[int, int]]]:
    """Every layer's projection shapes [out, in], by projection name."""
    found = []
    for i in range(adapter.num_layers):
        found.append({name: tuple(p.weight.shape) for block in adapter.parts(i).blocks().values()
                      for name, p in block.proj.items()})
    return found


def _format(config: QuantConfig, bits: int, high_rows: tuple[int, ...] = ()) -> WeightFormat:
    """`bits` in the run's grid; with `high_rows`, the channel split of the two widths."""
    if high_rows:
        return WeightFormat(config.alloc_choices[0], config.group_size, config.symmetric,
                            config.alloc_choices[1], high_rows)
    return WeightFormat(bits, config.group_size, config.symmetric)


def _cost(fmt: WeightFormat, shape: tuple[int, int]) -> int:
    return storage_bits(*shape, fmt.bits, fmt.group_size, fmt.symmetric, len(fmt.high_rows),
                        fmt.high_bits)


def budget_range(model: torch.nn.Module, config: QuantConfig) -> tuple[float, float, int]:
    """(lowest, highest average bits the allocation can reach, number of weights) for this
    model's projections: every unit at its cheapest option, every unit at its dearest."""
    shapes = [s for layer in _shapes(DecoderAdapter(model)) for s in layer.values()]
    low, high = config.alloc_choices[0], config.alloc_choices[-1]
    weights = sum(r * c for r, c in shapes)
    cheapest = sum(_cost(_format(config, low), s) for s in shapes)
    if config.alloc_unit == "channel":
        dearest = sum(_cost(_format(config, low, tuple(range(round(CHANNEL_RATIOS[-1] * r)))),
                            (r, c)) for r, c in shapes)
    else:
        dearest = sum(_cost(_format(config, high), s) for s in shapes)
    return cheapest / weights, dearest / weights, weights


def check_budget(model: torch.nn.Module, config: QuantConfig) -> None:
    """Raise ConfigError when `config.avg_bits` is out of this model's reach."""
    low, high, _ = budget_range(model, config)
    if not low <= config.avg_bits <= high:
        what = (f"{config.alloc_choices[0]}-bit with {CHANNEL_RATIOS[-1]:.0%} of the rows at "
                f"{config.alloc_choices[1]} bits" if config.alloc_unit == "channel"
                else f"{config.alloc_choices[-1]}-bit")
        raise ConfigError(
            f"avg_bits {config.avg_bits} is out of reach: with group_size {config.group_size} "
            f"this model's projections take {low:.4f} bits per weight all at "
            f"{config.alloc_choices[0]} bits and {high:.4f} all {what} (codes, 16-bit scales, "
            "zero points; docs/MIXED.md); choose avg_bits in that range")


def allocation_units(adapter: DecoderAdapter, config: QuantConfig,
                     fisher: dict[tuple[int, str], torch.Tensor] | None = None
                     ) -> list[UnitOptions]:
    """The units of `config.alloc_unit`, in chain order (layer by layer, projections in the
    layer's order). A channel unit needs `fisher` to rank each projection's rows."""
    units = []
    for i, shapes in enumerate(_shapes(adapter)):
        if config.alloc_unit == "channel":
            gains = _row_gains(adapter, i, config, fisher)
            formats = []
            for ratio in CHANNEL_RATIOS:
                fmts = {}
                for name, (rows, _) in shapes.items():
                    k = round(ratio * rows)
                    top = torch.topk(gains[name], k).indices.sort().values.tolist() if k else []
                    fmts[name] = _format(config, config.alloc_choices[0], tuple(top))
                formats.append(fmts)
            labels = [f"{r:.0%}" for r in CHANNEL_RATIOS]
            groups = [(f"layer {i}", formats, labels)]
        else:
            def uniform(names: tuple[str, ...]) -> list[dict[str, WeightFormat]]:
                return [{n: _format(config, b) for n in names} for b in config.alloc_choices]

            labels = [str(b) for b in config.alloc_choices]
            if config.alloc_unit == "layer":
                groups = [(f"layer {i}", uniform(tuple(shapes)), labels)]
            else:
                groups = [(f"layer {i} {name}", uniform((name,)), labels) for name in shapes]
        for name, formats, labels in groups:
            costs = [sum(_cost(f, shapes[p]) for p, f in fmts.items()) for fmts in formats]
            units.append(UnitOptions(name, i, labels, formats, costs))
    return units


def _row_gains(adapter: DecoderAdapter, layer: int, config: QuantConfig,
               fisher: dict[tuple[int, str], torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Per projection of `layer`, what each output channel gains at the higher width: the
    Fisher-weighted rounding error sum_j F_ij (e_low_ij^2 - e_high_ij^2) (RTN errors)."""
    if fisher is None:
        raise ValueError("the channel unit ranks rows by Fisher scores")
    low, high = config.alloc_choices
    gains = {}
    for block in adapter.parts(layer).blocks().values():
        for name, p in block.proj.items():
            w = p.weight.detach().float()
            err = [(fake_quantize_weight(w, _format(config, b)) - w).pow(2) for b in (low, high)]
            gains[name] = (fisher[layer, name].to(w.device) * (err[0] - err[1])).sum(1)
    return gains


class LossScan:
    """The mean next-token loss (nats) of calibration windows, computed from the FP hidden
    state entering some layer through the model's layers *as they are now* (so a caller
    rounds some projections in place, measures, restores). States are cached forward only:
    ask for layers in increasing order."""

    def __init__(self, adapter: DecoderAdapter, windows: torch.Tensor, chunk: int):
        self.adapter, self.windows, self.chunk = adapter, windows, chunk
        spec = LayerQuantSpec(wbits=16, abits=16, lora_rank=0, lwc=False)
        self.views = [QuantDecoderLayer(adapter.parts(i), spec)
                      for i in range(adapter.num_layers)]
        self.device = adapter.embed.weight.device
        x = embed(adapter, windows, chunk)
        self.rope = adapter.rotary(x[:1].to(self.device), windows.shape[1])
        self._state = (0, x)

    @torch.no_grad()
    def _run(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        cos, sin = self.rope
        out = []
        for lo in range(0, len(x), self.chunk):
            h = x[lo:lo + self.chunk].to(self.device)
            for view in self.views[first:last]:
                h = view(h, cos, sin)
            out.append(h.float().cpu())
        return torch.cat(out)

    def state(self, layer: int) -> torch.Tensor:
        """The FP hidden state entering `layer` (layers before it must be FP now)."""
        at, x = self._state
        if layer < at:
            raise ValueError(f"states are cached forward only (at {at}, asked {layer})")
        self._state = (layer, self._run(x, at, layer))
        return self._state[1]

    @torch.no_grad()
    def loss(self, layer: int = 0) -> float:
        """The loss with layers `layer`.. as they are now, on the FP state entering it."""
        h = self._run(self.state(layer), layer, len(self.views))
        nlls = []
        for j in range(len(h)):  # one window at a time: logits are [T, vocab]
            x = h[j:j + 1].to(self.device)
            logits = self.adapter.lm_head(self.adapter.final_norm(x))[0, :-1].float()
            target = self.windows[j, 1:].to(self.device)
            nlls.append(torch.nn.functional.cross_entropy(logits, target).item())
        return sum(nlls) / len(nlls)


class _Applied:
    """Round some projections in place (RTN in the given formats); restore on exit."""

    def __init__(self, adapter: DecoderAdapter, formats: dict[int, dict[str, WeightFormat]]):
        self.targets = []
        for i, fmts in formats.items():
            for block in adapter.parts(i).blocks().values():
                for name, p in block.proj.items():
                    if name in fmts and fmts[name].bits < 16:
                        self.targets.append((p.weight, fmts[name]))

    def __enter__(self) -> None:
        self.saved = [w.detach().clone() for w, _ in self.targets]
        with torch.no_grad():
            for w, fmt in self.targets:
                w.copy_(fake_quantize_weight(w, fmt))

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for (w, _), value in zip(self.targets, self.saved, strict=True):
                w.copy_(value)


def fisher_diagonal(adapter: DecoderAdapter, windows: torch.Tensor
                    ) -> dict[tuple[int, str], torch.Tensor]:
    """E[g^2] of every projection weight: the squared gradient of each window's mean
    next-token loss, averaged over the windows, times the T - 1 predicted tokens of a window
    (the per-token Fisher, if the tokens' gradients are uncorrelated). Costs one forward and
    backward pass per window on the model's device."""
    weights = {(i, name): p.weight for i in range(adapter.num_layers)
               for block in adapter.parts(i).blocks().values() for name, p in block.proj.items()}
    flags = {k: w.requires_grad for k, w in weights.items()}
    acc = {k: torch.zeros_like(w, dtype=torch.float32) for k, w in weights.items()}
    device = adapter.embed.weight.device
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for row in windows:
            ids = row.unsqueeze(0).to(device)
            logits = adapter.model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
            grads = torch.autograd.grad(loss, list(weights.values()))
            for k, g in zip(weights, grads, strict=True):
                acc[k] += g.float().pow(2)
    finally:
        for k, w in weights.items():
            w.requires_grad_(flags[k])
    scale = (windows.shape[1] - 1) / len(windows)
    return {k: v * scale for k, v in acc.items()}


def _fisher_loss(adapter: DecoderAdapter, fisher: dict[tuple[int, str], torch.Tensor],
                 layer: int, formats: dict[str, WeightFormat]) -> float:
    """The Fisher estimate of the loss change: 1/2 sum F (RTN(w) - w)^2 over the unit."""
    total = 0.0
    for block in adapter.parts(layer).blocks().values():
        for name, p in block.proj.items():
            if name in formats and formats[name].bits < 16:
                w = p.weight.detach().float()
                err = fake_quantize_weight(w, formats[name]) - w
                total += 0.5 * float((fisher[layer, name].to(w.device) * err.pow(2)).sum())
    return total


def allocate(model: torch.nn.Module, config: QuantConfig, calib: torch.Tensor,
             progress: Progress | None = None) -> Allocation:
    """Spend `config.avg_bits` over the units of `config.alloc_unit`: score every option of
    every unit on the first `config.alloc_windows` calibration windows (or all; never evaluation
    data), solve the budgeted choice exactly (allocation.solve), and measure the loss of the
    chosen allocation with every projection rounded to nearest. The model ends as it began.

    Scores (`alloc_score`): `rtn` measures the loss change with the unit's projections
    rounded to nearest in that option and everything else FP; with pairs, also every
    option pair of neighbouring units (the term beyond the two single changes). `fisher`
    estimates it as 1/2 sum F (RTN(w) - w)^2 with the Fisher diagonal F (no pair terms).
    """
    began = time.perf_counter()
    adapter = DecoderAdapter(model)
    for p in model.parameters():
        p.requires_grad_(False)
    windows = calib[:config.alloc_windows]
    chunk = config.inference_batch_size
    needs_fisher = config.alloc_score == "fisher" or config.alloc_unit == "channel"
    fisher = fisher_diagonal(adapter, windows) if needs_fisher else None
    units = allocation_units(adapter, config, fisher)
    scan = LossScan(adapter, windows, chunk)
    fp = scan.loss(0)
    pairs: list[np.ndarray | None] = [None] * (len(units) - 1)
    measured = config.alloc_score == "rtn"
    total = sum(len(u.labels) for u in units) if measured else 0
    if measured and config.uses_pairs:
        total += sum(len(a.labels) * len(b.labels) for a, b in itertools.pairwise(units))
    done = 0

    def measure(formats: dict[int, dict[str, WeightFormat]]) -> float:
        nonlocal done
        with _Applied(adapter, formats):
            value = scan.loss(min(formats)) - fp
        done += 1
        if progress:
            progress("allocation scan", done, total)
        return value

    deltas: list[list[float]] = []
    joint: list[np.ndarray] = []  # measured changes of unit u and u + 1 together
    for u, unit in enumerate(units):  # every scan starts at unit u's layer: states go forward
        if measured:
            deltas.append([measure({unit.layer: f}) for f in unit.formats])
        else:
            deltas.append([_fisher_loss(adapter, fisher, unit.layer, f) for f in unit.formats])
        if measured and config.uses_pairs and u + 1 < len(units):
            after = units[u + 1]
            joint.append(np.array([[measure(_merge({unit.layer: fa}, {after.layer: fb}))
                                    for fb in after.formats] for fa in unit.formats]))
    for u, both in enumerate(joint):  # the term beyond the two single changes
        pairs[u] = both - np.array(deltas[u])[:, None] - np.array(deltas[u + 1])[None, :]
    options = [[Option(c, d) for c, d in zip(u.costs, ds, strict=True)]
               for u, ds in zip(units, deltas, strict=True)]
    weights = sum(r * c for layer in _shapes(adapter) for r, c in layer.values())
    budget = budget_bits(config.avg_bits, weights)
    solution = solve(options, budget, pairs)
    formats: dict[int, dict[str, WeightFormat]] = {}
    for unit, choice in zip(units, solution.choices, strict=True):
        formats.setdefault(unit.layer, {}).update(unit.formats[choice])
    with _Applied(adapter, formats):
        rounded = LossScan(adapter, windows, chunk).loss(0)
    record = {
        "avg_bits_budget": config.avg_bits, "avg_bits": solution.cost / weights,
        "storage_bits": solution.cost, "budget_bits": budget, "weights": weights,
        "unit": config.alloc_unit, "score": config.alloc_score, "pairs": config.uses_pairs,
        "choices": {u.name: u.labels[c] for u, c in zip(units, solution.choices, strict=True)},
        "bits": {str(i): {name: _describe(f) for name, f in fmts.items()}
                 for i, fmts in formats.items()},
        "options": {u.name: dict(zip(u.labels, ds, strict=True))
                    for u, ds in zip(units, deltas, strict=True)},
        "pair_terms": {f"{a.name} | {b.name}": p.tolist()
                       for (a, b), p in zip(itertools.pairwise(units), pairs, strict=True)
                       if p is not None},
        "fp_loss": fp, "predicted_loss": fp + solution.loss, "rtn_loss": rounded,
        "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
        "seconds": round(time.perf_counter() - began, 1),
    }
    return Allocation(formats, record)


def calibration_loss(model: torch.nn.Module, calib: torch.Tensor, chunk: int) -> float:
    """The mean next-token loss of `calib` through the model's weights as they are (weights
    only: run-time activation quantizers are not applied)."""
    return LossScan(DecoderAdapter(model), calib, chunk).loss(0)


def _merge(*parts: dict[int, dict[str, WeightFormat]]) -> dict[int, dict[str, WeightFormat]]:
    merged: dict[int, dict[str, WeightFormat]] = {}
    for part in parts:
        for i, fmts in part.items():
            merged.setdefault(i, {}).update(fmts)
    return merged


def _describe(fmt: WeightFormat) -> int | str:
    """A projection's bits for the record: an int, or e.g. "2+3 (31 rows)" for a split."""
    if not fmt.split:
        return fmt.bits
    return f"{fmt.bits}+{fmt.high_bits} ({len(fmt.high_rows)} rows)"


def allocation_summary(record: dict) -> str:
    """One line: the average bits reached, the choices by count, the losses."""
    counts: dict[str, int] = {}
    for label in record["choices"].values():
        counts[label] = counts.get(label, 0) + 1
    unit = record["unit"]
    choices = ", ".join(f"{n} at {label}{'' if unit == 'channel' else ' bits'}"
                        for label, n in counts.items())
    losses = (f"calibration loss FP {record['fp_loss']:.4f}, predicted "
              f"{record['predicted_loss']:.4f}, all rounded {record['rtn_loss']:.4f}")
    if "final_loss" in record:
        losses += f", final {record['final_loss']:.4f}"
    return (f"{record['avg_bits']:.4f} bits per weight (budget {record['avg_bits_budget']}); "
            f"{len(record['choices'])} {unit} units: {choices}; {losses}")
