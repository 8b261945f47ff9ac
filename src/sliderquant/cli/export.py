"""`sliderquant export`: write a finished run as a compressed checkpoint (transformers,
vLLM) or a GGUF file (llama.cpp)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sliderquant.cli.printing import say

NAME = "export"
HELP = "export a quantized run as a compressed checkpoint (transformers, vLLM) or GGUF (llama.cpp)"
DESCRIPTION = (
    "Write the run folder RUN for an inference engine. --format compressed (alias: packed): "
    "a Hugging Face folder in the compressed-tensors pack-quantized format holding the "
    "learned integer codes exactly (W2/W3/W4/W8, per channel or in groups; W4A4 as int4 "
    "weights with dynamic per-token int4 inputs); it prints which engines run it. "
    "--format gguf: a GGUF file for llama.cpp; the codes are written as Q4_1 (4-bit), Q2_K "
    "(2-bit), Q8_0 (8-bit) blocks wherever the block type reproduces the grid, otherwise "
    "re-quantized to the nearest GGUF type with a warning and the measured error (3-bit -> "
    "Q3_K), or stored as Q4_1 when the row length does not fit the 256-long k-quant blocks. "
    "Both load back with `sliderquant eval`. --overwrite replaces only an earlier export.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a finished run folder (from sliderquant quantize --out)")
    p.add_argument("--format", required=True, choices=["compressed", "packed", "gguf"],
                   help="compressed (compressed-tensors pack-quantized; 'packed' is its old "
                        "name) or gguf (llama.cpp)")
    p.add_argument("--out", type=Path, help="output folder (compressed) or file (gguf); "
                   "default RUN/compressed (RUN/packed for --format packed) or RUN/model.gguf")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an earlier export of sliderquant (anything "
                        "else is refused)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="compressed: dtype of the unquantized tensors and scales (default: "
                        "the source model's own; float16 for a GGUF whose matrices are all "
                        "quantized)")
    p.add_argument("--exact", action="store_true",
                   help="gguf: never re-quantize; tensors no GGUF block type holds exactly "
                        "are stored as Q4_1 (grids of <= 4 bits) or as floats")
    p.add_argument("--float-type", choices=["f16", "bf16", "f32"], default="f16",
                   help="gguf: storage of unquantized matrices (default f16; norms are f32)")
    p.add_argument("--embedding-type", choices=["f16", "bf16", "f32", "q8_0"],
                   help="gguf: storage of the token embedding (default: --float-type)")
    p.add_argument("--vocab-from", type=Path,
                   help="gguf: copy the tokenizer from this GGUF (default: the GGUF the run's "
                        "model came from, else converted from the run's tokenizer.json)")
    p.add_argument("--drop-activation-quantization", action="store_true",
                   help="export only the weights of a run with activation quantization "
                        "(W4A4; required for gguf, which holds weights only); engines then "
                        "run it weight-only")
    p.add_argument("--json", type=Path, help="also write the per-tensor report to this file")
    p.add_argument("--quiet", action="store_true", help="print only the result line")


def run(args: argparse.Namespace) -> int:
    from sliderquant import api

    def warn(text: str) -> None:
        say(args, f"warning: {text}")

    result = api.export(args.run, args.format, args.out, overwrite=args.overwrite,
                        dtype=args.dtype, exact=args.exact, float_type=args.float_type,
                        embedding_type=args.embedding_type, vocab_from=args.vocab_from,
                        drop_activation_quantization=args.drop_activation_quantization,
                        warn=warn)
    print(f"wrote {result.path} ({result.size_bytes / 2**20:.1f} MiB, {result.format})")
    if not args.quiet:
        for line in result.summary():
            print(f"  {line}")
        for line in result.notes:
            print(f"  note: {line}")
    if args.json:
        from sliderquant.atomic import write_text

        write_text(args.json, json.dumps(result.to_dict(), indent=1))
    return 0
