"""Is an N-process run exactly the 1-process run with its batches split the way N ranks
split them? Runs one process whose optimiser step does what the ranks do together (each
rank's members of the batch, loss weighted by their share, gradients summed), with no
communication, and compares it with an N-process run folder of `benchmarks/distributed.py
--keep`:

    OMP_NUM_THREADS=1 python benchmarks/distributed_split.py stories260k /tmp/keep/n2 2 \\
        --data-dir ../shared/data

Equal results mean the N-process run differs from the plain 1-process run only by the
float rounding of splitting a batch (docs/DISTRIBUTED.md). The step below mirrors
`Engine._optimise`; keep the two in step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from store import record_cell

from sliderquant import QuantConfig, api
from sliderquant.distributed import shard as make_shard
from sliderquant.engine import Engine
from sliderquant.quant.learnables import optimiser_groups

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "distributed.json"


def split_optimise(world: int):
    def _optimise(self, layers, xq, target, shard, rate, generator, lr_factor, bar):
        cfg, lrs = self.config, self.config.learning_rates
        groups = [{"params": p, "lr": lrs[name] * lr_factor}
                  for name, p in optimiser_groups(layers).items() if p and lrs[name] > 0]
        n, epochs = shard.total, cfg.epochs_per_stage
        total = epochs * math.ceil(n / cfg.batch_size)
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1.0 - step / total))
        ranks = [make_shard(n, r, world) for r in range(world)]
        losses = []
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            epoch_loss = 0.0
            for lo in range(0, n, cfg.batch_size):
                idx = order[lo:lo + cfg.batch_size]
                optimizer.zero_grad(set_to_none=True)
                batch_loss = 0.0
                for s in ranks:
                    rows = s.local(idx) + s.start
                    if not len(rows):
                        continue
                    with self._autocast():
                        h = xq[rows].to(self.device)
                        for layer in layers:
                            h = layer(h, self.cos, self.sin, True, rate)
                        loss = F.mse_loss(h.float(), target[rows].to(self.device).float())
                    loss = loss * (len(rows) / len(idx))
                    loss.backward()
                    batch_loss += loss.item()
                optimizer.step()
                schedule.step()
                epoch_loss += batch_loss * len(idx)
            losses.append(epoch_loss / n)
        return losses
    return _optimise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("run", help="an N-process run folder (benchmarks/distributed.py --keep)")
    parser.add_argument("world", type=int)
    parser.add_argument("--data-dir", required=True)
    a = parser.parse_args()
    record = json.loads((Path(a.run) / "sliderquant.json").read_text())
    Engine._optimise = split_optimise(a.world)
    loaded = api.load(a.model, a.data_dir)
    cpu = time.process_time()
    result = api.quantize(loaded.model, loaded.tokenizer, QuantConfig.from_dict(record["config"]),
                          data_dir=a.data_dir, show_progress=False)
    ours = [w["epoch_losses"] for w in result.report["windows"]]
    theirs = [w["epoch_losses"] for w in record["windows"]]
    folded = load_file(str(Path(a.run) / "model.safetensors"))
    state = result.model.state_dict()
    cell = {
        "command": f"python benchmarks/distributed_split.py {a.model} RUN {a.world} "
                   f"--data-dir {a.data_dir}",
        "compared_with": f"the {record['ranks']['world_size']}-process run "
                         f"({record['ranks']['backend']}) of the same settings",
        "max_abs_weight_diff": max((state[k] - folded[k]).abs().max().item() for k in folded),
        "rel_loss_diff_per_window": [
            float(f"{max(abs(x - y) / abs(y) for x, y in zip(o, t, strict=True)):.2g}")
            for o, t in zip(ours, theirs, strict=True)],
        "cpu_s": round(time.process_time() - cpu, 1),
        "date": date.today().isoformat(),
    }
    key = f"split-batch 1-process emulation|{a.model}|{a.world}"
    meta = json.loads(RESULTS.read_text())["_meta"]
    record_cell(RESULTS, meta, key, cell)
    print(key, json.dumps(cell))
    return 0


if __name__ == "__main__":
    sys.exit(main())
