"""Checkpoint of the learnables after every window, for `--resume`.

One safetensors file holds every layer's learnables (`layers.<i>.<name>`) and, in its
metadata, the progress record (JSON). It is replaced atomically, so a crash leaves either
the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from sliderquant.atomic import atomic_path

FILENAME = "learnables.safetensors"


class CheckpointError(RuntimeError):
    """The checkpoint is missing, corrupt or belongs to a different run."""


class CheckpointStore:
    """Reads and writes `<directory>/learnables.safetensors`."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / FILENAME

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, tensors: dict[str, torch.Tensor], progress: dict) -> None:
        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        with atomic_path(self.path) as tmp:
            save_file(data, str(tmp), metadata={"progress": json.dumps(progress)})

    def load(self) -> tuple[dict[str, torch.Tensor], dict]:
        if not self.exists():
            raise CheckpointError(f"no checkpoint at {self.path}; start without --resume")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(self.path))
            progress = json.loads(metadata["progress"])
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {self.path} is unreadable or corrupt ({e}); "
                "delete it and start over without --resume (or pass --overwrite)"
            ) from e
        return tensors, progress
