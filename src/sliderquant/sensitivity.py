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

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from sliderquant.calibration import calibration_ids
from sliderquant.config import QuantConfig
from sliderquant.data import resolve_data_root
from sliderquant.eval.perplexity import eval_windows, perplexity_from_nlls, window_nlls
from sliderquant.models.adapters import DecoderAdapter
from sliderquant.quant.quantizer import fake_quantize
from sliderquant.quant.runtime import (
    ActQuantLinear,
    quantize_router_input,
    register_attention,
    register_experts,
)
from sliderquant.span import quantize_span
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
