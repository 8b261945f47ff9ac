"""The window loop: capture, per-window targets, training, cache advancing, checkpoints.

ALGORITHM.md §7–§8. The engine trains the learnables of `QuantDecoderLayer`s in place;
it knows nothing of files other than the checkpoint store it is handed, nor of the CLI.

A run is a list of *units*, one per (stage, window) in `global_passes` mode (the reference
code: whole schedule at fraction 1/N, then again at 2/N, …) or one per window in
`per_window` mode (the paper's wording: every fraction inside each window). The quantized
cache `X_q` is advanced from the embedding output through finished layers only, so it can
be rebuilt exactly when a run resumes.

Data parallel (`distributed.Collective` with several ranks): each rank holds only its shard
of the calibration windows (and so of every cache), computes only its shard's FP targets and
cache advances, and contributes to each global batch the members it holds; gradients are
summed over the ranks every step, so every rank takes the single-process optimiser step.
Only rank 0 is given a checkpoint store (pipeline.py) and shows progress.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sliderquant.checkpoint import CheckpointError, CheckpointStore
from sliderquant.config import QuantConfig
from sliderquant.distributed import Collective, Shard
from sliderquant.quant.layer import QuantDecoderLayer
from sliderquant.quant.learnables import optimiser_groups
from sliderquant.schedule import Window, build_schedule, check_coverage, fixed, parse_schedule

MAX_RETRIES = 2  # a window whose loss turns non-finite is retried this often at half the LR
# rows of the calibration set the before/after loss passes run on: enough for a stable mean
# squared error, few enough that two no-grad passes per window stay cheap next to training
LOSS_PASS_ROWS = 4


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite and the automatic recovery did not help."""


@dataclass(frozen=True)
class Unit:
    stage: int
    window: int
    layers: Window
    train_rates: tuple[float, ...]
    advance_rate: float


@dataclass
class WindowRecord:
    stage: int
    window: int
    layers: list[int]
    rates: list[float]
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    retries: int = 0
    # the window's loss before its first step (learnables at their start, e.g. RTN grids)
    # and after its last one: each a no-grad pass over the first LOSS_PASS_ROWS calibration
    # rows at the window's last quantized fraction, so the two are measured the same way
    initial_loss: float | None = None
    final_loss: float | None = None
    # with config.holdout: after each epoch, the loss on the held-out calibration rows
    heldout_losses: list[float] = field(default_factory=list)


def make_schedule(config: QuantConfig, num_layers: int) -> list[Window]:
    """The window schedule a config asks for."""
    if config.schedule:
        return parse_schedule(config.schedule, num_layers)
    if config.method == "sliderquant":
        schedule = build_schedule(num_layers, config.shallow, config.deep,
                                  config.window_size, config.stride)
    else:
        schedule = fixed(num_layers, config.window_size, config.stride)
    check_coverage(schedule, num_layers)
    return schedule


def make_units(config: QuantConfig, schedule: list[Window]) -> list[Unit]:
    rates = config.stage_rates
    if config.intra_mode == "per_window":
        return [Unit(0, r, w, tuple(rates), 1.0) for r, w in enumerate(schedule)]
    return [Unit(s, r, w, (rate,), rate) for s, rate in enumerate(rates)
            for r, w in enumerate(schedule)]


def window_loss(pred: torch.Tensor, target: torch.Tensor, mask: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, plain MSE). With `mask` > 0 the training loss leaves out the largest
    `mask` fraction of squared errors (auto-round's outlier-masked MSE at <= 3 bits)."""
    err = (pred - target).pow(2)
    mse = err.mean()
    k = int(err.numel() * mask)
    if k == 0:
        return mse, mse
    threshold = torch.topk(err.detach().flatten(), k).values[-1]
    keep = err < threshold
    return (err * keep).sum() / keep.sum().clamp_min(1), mse


def learnable_state(layers: list[QuantDecoderLayer]) -> dict[str, torch.Tensor]:
    """Every learnable tensor of `layers` (parameters and persistent buffers, such as the
    hardened-rounding marks), keyed for checkpoints."""
    return {f"layers.{i}.{name}": t for i, layer in enumerate(layers)
            for name, t in layer.state_dict(keep_vars=True).items()}


class SignSGD(torch.optim.Optimizer):
    """p -= lr * sign(grad): SignRound's update (auto-round), every entry moves by exactly
    the learning rate whatever its gradient's size, so rounding offsets cross boundaries
    in a fixed number of steps."""

    def __init__(self, params, lr: float = 1e-2):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


class BestEpoch:
    """Keeps a copy of `state` (learnable tensors, changed in place by training) from the
    epoch with the lowest loss offered, and puts it back with `restore`. The engine offers
    the epoch's running training mean, or with `holdout` the held-out rows' loss after it."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self.loss = float("inf")
        self.kept: dict[str, torch.Tensor] | None = None
        self.kept_last = False

    def offer(self, loss: float) -> None:
        """The epoch just finished had mean loss `loss`; keep its learnables if lowest."""
        self.kept_last = loss < self.loss
        if self.kept_last:
            self.loss = loss
            self.kept = {k: v.detach().clone() for k, v in self.state.items()}

    @torch.no_grad()
    def restore(self) -> None:
        """Back to the kept epoch's learnables (nothing to do if the last one was kept)."""
        if self.kept is None or self.kept_last:
            return
        for name, value in self.state.items():
            value.copy_(self.kept[name])


def hardening_fractions(units: list[Unit]) -> list[dict[int, float]]:
    """Per unit, the fraction of learned rounding each of its layers has hardened when the
    unit ends: k / K after the k-th of the K units that contain the layer, so a layer's
    codes are final when its last window ends."""
    total: dict[int, int] = {}
    for unit in units:
        for i in unit.layers:
            total[i] = total.get(i, 0) + 1
    seen: dict[int, int] = {}
    fractions = []
    for unit in units:
        for i in unit.layers:
            seen[i] = seen.get(i, 0) + 1
        fractions.append({i: seen[i] / total[i] for i in unit.layers})
    return fractions


class Engine:
    """Trains `layers` window by window on calibration hidden states.

    Activations stay on the host; a layer is moved to `device` only while it is run or
    trained and then returned to where it was, so a model larger than the accelerator
    still fits as long as one window does.
    """

    def __init__(
        self,
        layers: list[QuantDecoderLayer],
        rope: tuple[torch.Tensor, torch.Tensor],
        config: QuantConfig,
        device: torch.device,
        store: CheckpointStore | None = None,
        fingerprint: str = "",
        on_unit_end: Callable[[WindowRecord], None] | None = None,
        show_progress: bool = True,
        collective: Collective | None = None,
    ):
        self.layers = layers
        self.cos, self.sin = (t.to(device) for t in rope)
        self.config = config
        self.device = device
        self.store = store
        self.fingerprint = fingerprint
        self.on_unit_end = on_unit_end
        self.comm = collective or Collective()
        self.show_progress = show_progress and self.comm.is_main
        self.schedule = make_schedule(config, len(layers))
        self.units = make_units(config, self.schedule)
        self.hardening = hardening_fractions(self.units)
        self.records: list[WindowRecord] = []
        self.peak_cache_bytes = 0  # most bytes the activation caches held at once (this rank)

    # ---- public ---------------------------------------------------------------------------
    def run(self, x0: torch.Tensor, resume: bool = False,
            shard: Shard | None = None) -> list[WindowRecord]:
        """Train every unit not yet done; `x0` is the embedding output on the host of the
        calibration windows `shard` [len(shard), T, d] (default: all of them)."""
        if shard is None:
            shard = Shard(0, x0.shape[0], x0.shape[0])
        done = self._restore() if resume else -1
        per_epoch = math.ceil((shard.total - self.config.holdout) / self.config.batch_size)
        steps_per_unit = [len(u.train_rates) * self.config.epochs_per_stage * per_epoch
                          for u in self.units]
        bar = tqdm(total=sum(steps_per_unit), initial=sum(steps_per_unit[:done + 1]),
                   unit="step", desc="sliderquant", disable=not self.show_progress,
                   dynamic_ncols=True)
        xq, xq_pos, xq_stage = x0, 0, None
        fp_cache: dict[int, torch.Tensor] = {0: x0}
        unstarted: set[int] = set()
        if self.config.search_start:  # layers not trained yet start from a searched clipping
            unstarted = set(range(len(self.layers))) - {
                i for u in self.units[:done + 1] for i in u.layers}
            for i in unstarted:
                self.layers[i].observe()
        for index, unit in enumerate(self.units):
            if index <= done:
                continue
            start = unit.layers[0]
            if xq_stage != unit.stage:
                xq, xq_pos, xq_stage = x0, 0, unit.stage
                fp_cache = {0: x0}
            if start > xq_pos:
                self._measure(x0, xq, *fp_cache.values(), pending=xq)
                xq = self._forward(range(xq_pos, start), xq, True, unit.advance_rate)
            xq_pos = start
            target = self._fp_state(fp_cache, unit.layers[-1] + 1, held=(x0, xq))
            self._measure(x0, xq, *fp_cache.values())
            for j in [j for j in fp_cache if 0 < j < start]:
                del fp_cache[j]
            for i in sorted(unstarted & set(unit.layers)):  # observed by the FP pass above
                with self._placed([self.layers[i]]):
                    self.layers[i].search_start()
                unstarted.discard(i)
            bar.set_description(f"stage {unit.stage + 1} window {unit.window + 1}/"
                                f"{len(self.schedule)} layers {start}-{unit.layers[-1]}")
            record = self._train_unit(unit, index, xq, target, shard, bar)
            if self.config.rounding:
                for i, fraction in self.hardening[index].items():
                    with self._placed([self.layers[i]]):
                        self.layers[i].harden_(fraction)
            self.records.append(record)
            self._save(index)
            if self.on_unit_end is not None:
                self.on_unit_end(record)
        bar.close()
        return self.records

    # ---- internals ------------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _placed(self, layers: list[QuantDecoderLayer]):
        """`layers` on the compute device inside the block. After it their learnables (and
        persistent buffers) go back to the model's device and their frozen weights are again
        the model's own tensors, so no second copy of a weight outlives the block."""
        homes = [layer.device for layer in layers]
        if all(home == self.device for home in homes):
            yield
            return
        # the model's own tensors are the non-persistent buffers; persistent ones (hardened
        # rounding marks) are learnable state and travel with the layer like its parameters
        frozen = [[(module, name, tensor) for module in layer.modules()
                   for name, tensor in module.named_buffers(recurse=False)
                   if name in module._non_persistent_buffers_set] for layer in layers]
        for layer in layers:
            layer.to(self.device)
        try:
            yield
        finally:
            for layer, home, buffers in zip(layers, homes, frozen, strict=True):
                layer.to(home)
                for module, name, tensor in buffers:
                    module.register_buffer(name, tensor, persistent=False)

    @torch.no_grad()
    def _forward(self, layer_ids, x: torch.Tensor, quantized: bool, rate: float) -> torch.Tensor:
        """Run `x` (host) through the given layers in inference chunks; result on the host.
        One layer visits the device at a time, so catching up over many layers (a resumed
        run, the FP targets of a late window) stays within one layer's memory there."""
        out, size = x, self.config.inference_batch_size
        for n, i in enumerate(layer_ids):
            source, out = out, (torch.empty_like(x) if n == 0 else out)
            with self._placed([self.layers[i]]), self._autocast():
                for lo in range(0, x.shape[0], size):
                    h = self.layers[i](source[lo:lo + size].to(self.device), self.cos, self.sin,
                                       quantized, rate)
                    out[lo:lo + size] = h.to(out.dtype).to(out.device)
        return out

    def _fp_state(self, cache: dict[int, torch.Tensor], position: int,
                  held: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """FP hidden state entering layer `position`, computed once per stage and cached
        (`held`: the other caches alive meanwhile, for the memory record)."""
        if position not in cache:
            base = max(j for j in cache if j < position)
            self._measure(*held, *cache.values(), pending=cache[base])
            cache[position] = self._forward(range(base, position), cache[base], False, 1.0)
        return cache[position]

    def _measure(self, *caches: torch.Tensor, pending: torch.Tensor | None = None) -> None:
        """Record the bytes of `caches` (each storage once) plus a `pending`-sized output
        about to be allocated next to them."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in caches if t.numel()}
        held = sum(storages.values()) + (pending.nbytes if pending is not None else 0)
        self.peak_cache_bytes = max(self.peak_cache_bytes, held)

    def _train_unit(self, unit: Unit, index: int, xq, target, shard, bar) -> WindowRecord:
        layers = [self.layers[i] for i in unit.layers]
        snapshot = {k: v.detach().clone() for k, v in learnable_state(layers).items()}
        bar_start, lr_factor, retry = bar.n, 1.0, 0
        while True:
            record = WindowRecord(unit.stage, unit.window, unit.layers, list(unit.train_rates),
                                  retries=retry)
            began = time.perf_counter()
            try:
                with self._placed(layers):
                    final_rate = unit.train_rates[-1]
                    first = torch.arange(min(LOSS_PASS_ROWS, shard.total))
                    record.initial_loss = self._loss(layers, xq, target, shard, final_rate,
                                                     first)
                    for k, rate in enumerate(unit.train_rates):
                        generator = torch.Generator().manual_seed(
                            self.config.seed * 1_000_003 + index * 17 + k)
                        losses, heldout = self._optimise(layers, xq, target, shard, rate,
                                                         generator, lr_factor, bar)
                        record.epoch_losses += losses
                        record.heldout_losses += heldout
                    record.final_loss = self._loss(layers, xq, target, shard, final_rate,
                                                   first)
                # replicas agree already (same reduced gradients); this makes it exact
                self.comm.broadcast_(learnable_state(layers).values())
                record.seconds = time.perf_counter() - began
                return record
            except NonFiniteLossError:
                if retry == MAX_RETRIES:
                    raise NonFiniteLossError(
                        f"the loss stayed NaN/inf in window {unit.window} (layers "
                        f"{unit.layers}, stage {unit.stage + 1}) after {MAX_RETRIES} retries at "
                        "half the learning rate each. Finished windows are checkpointed; lower "
                        "--lora-lr/--clip-lr/--scale-lr and start again with --overwrite."
                    ) from None
            with torch.no_grad():
                for name, value in learnable_state(layers).items():
                    value.copy_(snapshot[name])
            lr_factor *= 0.5
            retry += 1
            bar.n = bar_start
            bar.refresh()
            if self.comm.is_main:
                tqdm.write(f"non-finite loss in window {unit.window}: restored its learnables, "
                           f"retrying at {lr_factor:g}x the learning rate")

    @torch.no_grad()
    def _loss(self, layers, xq, target, shard, rate, rows: torch.Tensor) -> float:
        """Mean squared error of the window's quantized output on the calibration rows
        `rows` (global indices), in inference chunks (the mean an epoch's loss takes); each
        rank sums the rows of those it holds."""
        local = shard.local(rows)
        xq, target = xq[local], target[local]
        total, size = 0.0, self.config.inference_batch_size
        with self._autocast():
            for lo in range(0, xq.shape[0], size):
                h = xq[lo:lo + size].to(self.device)
                for layer in layers:
                    h = layer(h, self.cos, self.sin, True, rate)
                y = target[lo:lo + size].to(self.device)
                total += F.mse_loss(h.float(), y.float(), reduction="sum").item()
        return self.comm.sum(total) / (len(rows) * math.prod(target.shape[1:]))

    def _optimise(self, layers, xq, target, shard, rate, generator, lr_factor, bar
                  ) -> tuple[list[float], list[float]]:
        """AdamW over the window's learnables; returns the epochs' mean training losses and,
        with `holdout`, their losses on the held-out rows. Batches are drawn from one
        permutation of the `shard.total - holdout` training windows; this rank runs the
        members it holds, its loss weighted by their share of the batch, so the gradients
        summed over the ranks are those of the batch's mean loss."""
        cfg = self.config
        lrs = cfg.learning_rates
        param_groups = {name: {"params": p, "lr": lrs[name] * lr_factor}
                        for name, p in optimiser_groups(layers).items() if p and lrs[name] > 0}
        params = [p for group in param_groups.values() for p in group["params"]]
        n = shard.total - cfg.holdout
        if n < 1:
            raise ValueError(f"holdout={cfg.holdout} leaves no training rows of {shard.total}")
        heldout_rows = torch.arange(n, shard.total)
        epochs = cfg.epochs_per_stage
        total = epochs * math.ceil(n / cfg.batch_size)
        if not param_groups:
            bar.update(total)
            return [], []
        adam = [g for name, g in param_groups.items() if name not in cfg.signed_groups]
        signed = [g for name, g in param_groups.items() if name in cfg.signed_groups]
        optimizers = ([torch.optim.AdamW(adam, weight_decay=0.0)] if adam else []) + (
            [SignSGD(signed)] if signed else [])
        schedules = [torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1.0 - step / total)) for optimizer in optimizers]
        losses, heldout = [], []
        best = BestEpoch(learnable_state(layers)) if cfg.best_epoch else None
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            epoch_loss = 0.0
            for lo in range(0, n, cfg.batch_size):
                idx = order[lo:lo + cfg.batch_size]
                mine = shard.local(idx)
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                loss = None
                if len(mine):
                    x = xq[mine].to(self.device)
                    y = target[mine].to(self.device)
                    with self._autocast():
                        h = x
                        for layer in layers:
                            h = layer(h, self.cos, self.sin, True, rate)
                        loss, _ = window_loss(h.float(), y.float(), cfg.loss_mask)
                        loss = loss * (len(mine) / len(idx))
                    loss.backward()
                batch_loss = self.comm.reduce_gradients(loss, params)
                if not math.isfinite(batch_loss):
                    raise NonFiniteLossError
                for optimizer, schedule in zip(optimizers, schedules, strict=True):
                    optimizer.step()
                    schedule.step()
                epoch_loss += batch_loss * len(idx)
                bar.update(1)
            losses.append(epoch_loss / n)
            bar.set_postfix(loss=f"{losses[-1]:.3g}")
            if cfg.holdout:
                heldout.append(self._loss(layers, xq, target, shard, rate, heldout_rows))
            if best is not None:
                best.offer(heldout[-1] if cfg.holdout else losses[-1])
        if best is not None:
            best.restore()
        return losses, heldout

    def _save(self, index: int) -> None:
        if self.store is None:
            return
        progress = {"done_unit": index, "num_units": len(self.units),
                    "fingerprint": self.fingerprint,
                    "records": [asdict(r) for r in self.records]}
        self.store.save(learnable_state(self.layers), progress)

    def _restore(self) -> int:
        """Load the checkpoint into the layers (rank 0 reads it, every rank receives it);
        return the index of the last finished unit."""
        done, records = self.comm.on_main(self._read_checkpoint)
        self.comm.broadcast_(learnable_state(self.layers).values())
        self.records = [WindowRecord(**r) for r in records]
        return done

    def _read_checkpoint(self) -> tuple[int, list[dict]]:
        if self.store is None:
            raise CheckpointError("resume needs a checkpoint store")
        tensors, progress = self.store.load()
        if progress.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                f"checkpoint {self.store.path} was written by a different model or config "
                "(fingerprint mismatch); rerun with the original settings, or start over "
                "with --overwrite")
        if progress.get("num_units") != len(self.units):
            raise CheckpointError(f"checkpoint {self.store.path} has a different schedule")
        state = learnable_state(self.layers)
        if set(tensors) != set(state) or any(tensors[k].shape != v.shape
                                              for k, v in state.items()):
            raise CheckpointError(f"checkpoint {self.store.path} does not match this model's "
                                  "learnables; start over with --overwrite")
        with torch.no_grad():
            for name, value in state.items():
                value.copy_(tensors[name])
        return int(progress["done_unit"]), progress["records"]
