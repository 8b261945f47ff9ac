"""Deployment benchmark: SmolLM2-135M exported to GGUF and run in llama.cpp.

    python benchmarks/deployment.py --data-dir ../shared/data

1. Quantizes SmolLM2-135M with SliderQuant's CPU presets (w4a16, w3a16, w2a16 --fast,
   calibrated on wikitext2:valid) plus an unquantized run (wbits 16), unless the run
   folders already exist under --work.
2. Exports each to GGUF with the default settings and W4A16 also to the packed format.
3. Perplexity equality: WikiText-2 test windows (--windows x --seqlen tokens) scored by
   sliderquant's evaluator on the run folder, by llama.cpp on the GGUF (same token ids),
   by transformers on the GGUF (`sliderquant eval FILE.gguf`), and for W4 by transformers
   on the packed folder, with and without the compressed-tensors package.
4. Table B: file size, peak RSS and tokens/s (prompt processing of --prompt tokens,
   greedy generation of --generate tokens) in llama.cpp, each model in its own process.
   `--speed-refresh` re-measures only this, for every model already recorded (run it on a
   quiet machine).

Needs the `deploy` extra (llama-cpp-python, compressed-tensors). Writes
docs/results/deployment.json and docs/results/deployment.md; rows are keyed by setting and
method ("W2A16 sliderquant"), so invocations with different --method / --settings add up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
MODEL = "smollm2-135m"
FP16 = ["--wbits", "16", "--method", "rtn", "--no-lwc", "--lora-rank", "0", "--nsamples", "1",
        "--seqlen", "64", "--batch-size", "1"]  # the unquantized model as a run folder
PRESETS = {"W4A16": "w4a16", "W3A16": "w3a16", "W2A16": "w2a16"}


def quantize_args(name: str, method: str) -> list[str]:
    if name == "FP16":
        return FP16
    fast = ["--fast"] if method != "rtn" else []
    return ["--preset", PRESETS[name], *fast, "--method", method]
TOLERANCE = 0.01  # |ppl_llama.cpp / ppl_sliderquant - 1| allowed for "same perplexity"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="data root with wikitext2/")
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / "out" / "deployment",
                   help="folder for the run folders and exported files")
    p.add_argument("--method", default="sliderquant",
                   help="quantization method of the W4/W3/W2 runs (sliderquant uses the "
                        "--fast presets; rtn takes seconds)")
    p.add_argument("--settings", default="FP16,W4A16,W3A16,W2A16",
                   help="comma-separated subset of FP16, W4A16, W3A16, W2A16")
    p.add_argument("--windows", type=int, default=4, help="WikiText-2 test windows")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens for speed")
    p.add_argument("--generate", type=int, default=128, help="generated tokens for speed")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads")
    p.add_argument("--speed-refresh", action="store_true",
                   help="only re-measure Table B (speed, peak RSS) of the recorded models")
    p.add_argument("--speed-only", metavar="GGUF", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.speed_only:
        print(json.dumps(speed(args.speed_only, args.prompt, args.generate, args.threads)))
        return 0
    if args.speed_refresh:
        return refresh_speed(args)

    args.work = args.work / args.method
    args.work.mkdir(parents=True, exist_ok=True)
    record = {"date": date.today().isoformat(), "machine": machine(), "model": MODEL,
              "protocol": {"dataset": "wikitext2 test", "windows": args.windows,
                           "seqlen": args.seqlen, "prompt_tokens": args.prompt,
                           "generated_tokens": args.generate, "threads": args.threads,
                           "tolerance": TOLERANCE},
              "command": "python benchmarks/deployment.py " + " ".join(sys.argv[1:]),
              "models": {}}
    for name in args.settings.split(","):
        run = args.work / name.lower()
        if not (run / "sliderquant.json").is_file():
            subprocess.run([sys.executable, "-m", "sliderquant", "quantize", MODEL,
                            *quantize_args(name, args.method), "--calib", "wikitext2:valid",
                            "--data-dir", args.data_dir, "--out", str(run), "--tasks", "none",
                            "--quiet"],
                           check=True)
        key = name if name == "FP16" else f"{name} {args.method}"
        record["models"][key] = {"method": args.method, "date": record["date"],
                                 "command": record["command"],
                                 **evaluate_setting(name, run, args)}
        write(record)
    record["load_after"] = os.getloadavg()
    write(record)
    return 0


def evaluate_setting(name: str, run: Path, args) -> dict:
    import torch

    from sliderquant import api
    from sliderquant.eval.llamacpp import llamacpp_window_nlls
    from sliderquant.eval.perplexity import eval_windows, perplexity_from_nlls, window_nlls

    gguf = run / "model.gguf"
    export = api.export(run, "gguf", gguf, overwrite=True)  # also reports the tensor storage
    loaded = api.load(str(run))
    windows = eval_windows("wikitext2", loaded.tokenizer, args.seqlen, args.windows,
                           api.resolve_data_root(args.data_dir))
    ppl = {"sliderquant": perplexity_from_nlls(window_nlls(loaded.model, windows, name))}
    del loaded
    ppl["llama.cpp"] = perplexity_from_nlls(llamacpp_window_nlls(gguf, windows, args.threads))
    from_gguf = api.load(str(gguf))
    ppl["transformers (GGUF)"] = perplexity_from_nlls(window_nlls(from_gguf.model, windows,
                                                                  f"{name} gguf"))
    del from_gguf
    out = {"run": str(run), "gguf_bytes": export.size_bytes,
           "gguf_tensors": export.summary(), "gguf_warnings": len(export.warnings),
           "ppl": ppl, "windows": int(windows.shape[0])}
    if name == "W4A16":
        packed = api.export(run, "packed", run / "packed", overwrite=True)
        out["packed_bytes"] = packed.size_bytes
        ours = api.load(str(run / "packed"))
        ppl["packed (sliderquant loader)"] = perplexity_from_nlls(
            window_nlls(ours.model, windows, "packed"))
        del ours
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig

        engine = AutoModelForCausalLM.from_pretrained(
            run / "packed", dtype=torch.float32,
            quantization_config=CompressedTensorsConfig(dequantize=True))
        ppl["packed (transformers + compressed-tensors)"] = perplexity_from_nlls(
            window_nlls(engine.eval(), windows, "packed/ct"))
        del engine
    out["speed"] = measure_speed(gguf, args)
    return out


def measure_speed(gguf: Path, args) -> dict:
    """`speed` in a fresh process, so that nothing else is resident."""
    done = subprocess.run([sys.executable, __file__, "--data-dir", args.data_dir,
                           "--speed-only", str(gguf), "--prompt", str(args.prompt),
                           "--generate", str(args.generate), "--threads", str(args.threads)],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def refresh_speed(args) -> int:
    """Re-measure Table B for every recorded model whose GGUF is still on disk."""
    path = RESULTS / "deployment.json"
    record = json.loads(path.read_text())
    record["protocol"].update(prompt_tokens=args.prompt, generated_tokens=args.generate,
                              threads=args.threads)
    record["speed_command"] = "python benchmarks/deployment.py " + " ".join(sys.argv[1:])
    record["speed_date"] = date.today().isoformat()
    for name, m in record["models"].items():
        gguf = Path(m["run"]) / "model.gguf"
        if not gguf.is_file():
            print(f"{name}: {gguf} is gone; export it again (run without --speed-refresh)")
            continue
        m["speed"] = measure_speed(gguf, args)
        print(name, m["speed"], flush=True)
        write(record)
    return 0


def speed(path: str, prompt: int, generate: int, threads: int) -> dict:
    """Prompt and generation tokens/s and peak RSS of one llama.cpp process."""
    import llama_cpp
    import numpy as np

    from sliderquant.api import peak_rss_mb
    from sliderquant.eval.llamacpp import open_gguf

    base = peak_rss_mb()
    llm = open_gguf(path, prompt + generate, threads, logits_all=False)
    ids = np.random.default_rng(0).integers(100, 10000, prompt).tolist()
    best_pp = best_tg = 0.0
    for _ in range(2):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        best_pp = max(best_pp, prompt / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(generate):
            last = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            llm.eval([int(np.argmax(np.ctypeslib.as_array(last, shape=(llm.n_vocab(),))))])
        best_tg = max(best_tg, generate / (time.perf_counter() - t))
    llm.close()
    peak = peak_rss_mb()
    return {"prompt_tok_s": round(best_pp, 1), "gen_tok_s": round(best_tg, 1),
            "peak_rss_mib": round(peak, 1), "rss_before_load_mib": round(base, 1),
            "load_avg": os.getloadavg()}


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "load_at_start": os.getloadavg()}


def write(record: dict) -> None:
    """Write the record, keeping the settings another invocation (--settings) measured."""
    from sliderquant.atomic import write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "deployment.json"
    if path.is_file():
        record["models"] = {**json.loads(path.read_text()).get("models", {}),
                            **record["models"]}
    write_text(path, json.dumps(record, indent=1))
    write_text(RESULTS / "deployment.md", markdown(record))


def markdown(r: dict) -> str:
    pr = r["protocol"]
    lines = [
        "## Deployment: SmolLM2-135M in llama.cpp (GGUF) and transformers (packed)",
        "",
        "Commands (rows accumulate across invocations): "
        + "; ".join(sorted({f"`{m['command']}` ({m['date']})" for m in r["models"].values()}))
        + f". Machine: {r['machine']['cores']} CPU cores. Runs: `sliderquant quantize "
        "smollm2-135m --preset wXa16 --method METHOD --calib wikitext2:valid`, with `--fast` "
        "for the learned methods (FP16: the unquantized model, `--wbits 16`). Exports: "
        "`sliderquant export RUN --format gguf` with default settings (non-quantized "
        "matrices F16, norms F32).",
        "",
        f"### Perplexity equality (WikiText-2 test, first {pr['windows']} windows x "
        f"{pr['seqlen']} tokens, same token ids everywhere)",
        "",
        "| model | sliderquant (run folder) | llama.cpp (GGUF) | ratio | transformers (GGUF) "
        "| packed (our loader) | packed (compressed-tensors) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in r["models"].items():
        p = m["ppl"]
        ratio = p["llama.cpp"] / p["sliderquant"]
        ok = "✓" if abs(ratio - 1) <= pr["tolerance"] else "✗"
        lines.append(
            f"| {name} | {p['sliderquant']:.3f} | {p['llama.cpp']:.3f} | {ratio:.4f} {ok} | "
            f"{p['transformers (GGUF)']:.3f} | "
            f"{_fmt(p.get('packed (sliderquant loader)'))} | "
            f"{_fmt(p.get('packed (transformers + compressed-tensors)'))} |")
    lines += ["", f"✓: within the stated tolerance of {pr['tolerance']:.0%} relative. "
              "llama.cpp multiplies quantized weights with activations it rounds to 8 bits "
              "(Q8_1/Q8_K) and F16 weights in half precision, so it is not bit-identical to "
              "the float32 evaluator; the FP16 row shows that engine difference alone.", "",
              "### Table B style: llama.cpp on this CPU", "",
              "| model | GGUF size (MiB) | peak RSS (MiB) | prompt tok/s | generation tok/s "
              "| load avg | tensor storage |",
              "|---|---|---|---|---|---|---|"]
    for name, m in r["models"].items():
        s = m["speed"]
        storage = storage_summary(m["gguf_tensors"])
        lines.append(f"| {name} | {m['gguf_bytes'] / 2**20:.1f} | {s['peak_rss_mib']:.0f} | "
                     f"{s['prompt_tok_s']:.0f} | {s['gen_tok_s']:.1f} | "
                     f"{s['load_avg'][0]:.1f} | {storage} |")
    if "speed_command" in r:
        lines += ["", f"Table B re-measured with `{r['speed_command']}` ({r['speed_date']}), "
                  "each model in a fresh process, one after the other."]
    lines += ["", f"Prompt: {pr['prompt_tokens']} tokens in one batch; generation: "
              f"{pr['generated_tokens']} greedy tokens; best of 2; {pr['threads']} threads; "
              "peak RSS of a fresh process that loads the model and runs both (the Python "
              "interpreter and llama.cpp library take about "
              f"{min(m['speed']['rss_before_load_mib'] for m in r['models'].values()):.0f} "
              "MiB of it). SmolLM2's rows are 576 wide, not a multiple of the 256-long "
              "k-quant blocks, so its 2- and 3-bit attention and gate/up projections are "
              "stored as Q4_1 (2-bit and 3-bit codes held exactly in 4-bit blocks): W2/W3 "
              "files are barely smaller than W4 here. Speeds measured while the machine was "
              "shared are not comparable across machines; the load average column says how "
              "busy it was.", ""]
    return "\n".join(lines)


def storage_summary(lines: list[str]) -> str:
    """Export summary lines ("Q3_K requantized 2 tensors 1.77 M params max err ...")
    merged per GGUF type and kind: "Q4_1 exact: 210 tensors, 106.2 M params; ..."."""
    totals: dict[tuple[str, str], list[float]] = {}
    for line in lines:
        found = re.match(r"\s*(\S+)\s+(\S+)\s+(\d+) tensors\s+([\d.]+) M params", line)
        if found:
            t = totals.setdefault((found[1], found[2]), [0, 0.0])
            t[0] += int(found[3])
            t[1] += float(found[4])
    return "; ".join(f"{kind} {how}: {n} tensors, {p:.1f} M params"
                     for (kind, how), (n, p) in totals.items())


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    raise SystemExit(main())
