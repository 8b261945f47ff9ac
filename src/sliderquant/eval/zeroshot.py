"""Zero-shot multiple-choice accuracy through EleutherAI's lm-evaluation-harness.

lm-eval supplies the tasks (prompts, answer choices, metrics, stderr); `ModelLM` scores
lm-eval's (context, continuation) requests with our in-memory model exactly as lm-eval's
own `HFLM` does: context and continuation are tokenized together and split (trailing
spaces of the context move to the continuation), the input is truncated from the left at
the model's context, and a continuation's score is the sum of its tokens' log-probabilities.
Two things save time without changing a number: the choices of one question run their
shared context once and their continuations on copies of its key/value cache, and the
output head runs only on the positions being scored.

With a data root the tasks read the local copies (`zeroshot_data`), otherwise lm-eval
downloads its hub datasets. Importing this module needs lm-eval (`pip install
"sliderquant[eval]"`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import __version__ as LM_EVAL_VERSION
from lm_eval.api.model import TemplateLM
from lm_eval.evaluator import evaluate
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from tqdm.auto import tqdm

from sliderquant.eval.zeroshot_data import TASKS, local_rows

__all__ = ["LM_EVAL_VERSION", "TASKS", "ModelLM", "build_tasks", "run_tasks", "summarize"]


class ModelLM(TemplateLM):
    """An in-memory transformers causal LM as an lm-eval model (loglikelihood requests only).

    `batch_tokens` bounds the padded tokens per forward pass over requests that share no
    context (e.g. WinoGrande's two sentences); right padding needs no attention mask.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, batch_tokens: int = 4096,
                 show_progress: bool = True):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_tokens = batch_tokens
        self.show_progress = show_progress
        self._device = next(model.parameters()).device
        self._max_length = getattr(model.config, "max_position_embeddings", None) or 2048
        self._decoder, self._head = model.get_decoder(), model.get_output_embeddings()

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        """The tokenizer's own default for special tokens, unless told; never a second BOS."""
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            options = {"add_special_tokens": False}
        return self.tokenizer.encode(string, **options)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, whether every continuation token is the argmax)."""
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if not 0 < len(continuation) <= self.max_length:
                raise ValueError(f"continuation of {len(continuation)} tokens does not fit the "
                                 f"model's context of {self.max_length}")
            # lm-eval keeps the last max_length + 1 tokens of context + continuation.
            keep = self.max_length + 1 - len(continuation)
            groups.setdefault(tuple(context[-keep:]), []).append((i, continuation))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood", unit="request",
                   disable=disable_tqdm or not self.show_progress, dynamic_ncols=True)
        alone = []
        for context, members in groups.items():
            if len(members) == 1:
                alone.append((context, *members[0]))
                continue
            for index, result in self._score_shared(context, members):
                results[index] = result
            bar.update(len(members))
        alone.sort(key=lambda r: -(len(r[0]) + len(r[2])))  # longest first: little padding
        start = 0
        while start < len(alone):
            count = max(1, self.batch_tokens // (len(alone[start][0]) + len(alone[start][2])))
            batch = alone[start:start + count]
            start += len(batch)
            for index, result in self._score_batch(batch):
                results[index] = result
            bar.update(len(batch))
        bar.close()
        return results

    def _score(self, hidden: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        """Score a continuation from the hidden states of the positions that predict it. The
        output head runs only there: most positions are context."""
        logprobs = F.log_softmax(self._head(hidden).float(), dim=-1)
        target = torch.tensor(continuation, device=logprobs.device)
        return (logprobs.gather(-1, target[:, None]).sum().item(),
                bool((logprobs.argmax(-1) == target).all()))

    def _score_batch(self, batch: list[tuple[tuple[int, ...], int, list[int]]]):
        """(index, result) of requests with distinct contexts: one right-padded forward."""
        inputs = [list(context) + continuation[:-1] for context, _, continuation in batch]
        ids = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long)
        for row, inp in enumerate(inputs):
            ids[row, :len(inp)] = torch.tensor(inp)
        hidden = self._decoder(input_ids=ids.to(self._device), use_cache=False).last_hidden_state
        for row, (_, index, continuation) in enumerate(batch):
            end = len(inputs[row])
            yield index, self._score(hidden[row, end - len(continuation):end], continuation)

    def _score_shared(self, context: tuple[int, ...], members: list[tuple[int, list[int]]]):
        """(index, result) of the choices of one context: the context runs once, the
        continuations then run together on copies of its key/value cache."""
        out = self._decoder(input_ids=torch.tensor([context], device=self._device),
                            use_cache=True)
        last = out.last_hidden_state[0, -1:]  # predicts every continuation's first token
        width = max(len(c) for _, c in members) - 1
        if width > 0:
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(members))
            ids = torch.zeros(len(members), width, dtype=torch.long)
            for row, (_, continuation) in enumerate(members):
                ids[row, :len(continuation) - 1] = torch.tensor(continuation[:-1])
            hidden = self._decoder(input_ids=ids.to(self._device), past_key_values=cache,
                                   use_cache=True).last_hidden_state
        for row, (index, continuation) in enumerate(members):
            positions = last if len(continuation) == 1 else torch.cat(
                [last, hidden[row, :len(continuation) - 1]])
            yield index, self._score(positions, continuation)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("sliderquant runs multiple-choice tasks only; use "
                                  "`sliderquant eval --tasks wikitext2,c4` for perplexity")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("sliderquant runs multiple-choice (loglikelihood) tasks only")


@contextmanager
def _quiet_lm_eval(level: int = logging.ERROR):
    """lm-eval logs a warning per task about custom datasets and metadata; keep it down."""
    logger = logging.getLogger("lm_eval")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


# Where lm-eval keeps the six task definitions; indexing only these takes milliseconds
# instead of the ~25 s of all of lm-eval's task folders.
_TASK_FOLDERS = ("piqa", "arc", "hellaswag", "winogrande", "super_glue/boolq")


@cache
def _task_manager() -> TaskManager:
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    return TaskManager(include_defaults=False, include_path=[root / f for f in _TASK_FOLDERS])


def _local_config(manager: TaskManager, task: str, data_root: Path) -> tuple[dict, str]:
    """lm-eval's own config for `task`, reading the local copy instead of the hub."""
    config = load_yaml(manager.task_index[task].yaml_path, resolve_func=True)
    split, rows, source = local_rows(task, data_root)

    def dataset(**_):
        from datasets import Dataset, DatasetDict

        return DatasetDict({split: Dataset.from_list(rows)})

    config.pop("tag", None)
    config.update(task=task, custom_dataset=dataset, dataset_kwargs=None,
                  training_split=None, fewshot_split=None, num_fewshot=0,
                  validation_split=split if split == "validation" else None,
                  test_split=split if split == "test" else None)
    if task == "hellaswag":
        config["process_docs"] = None  # the local rows are already processed (see zeroshot_data)
    return config, f"local {source}"


def build_tasks(tasks: tuple[str, ...], data_root: Path | None) -> tuple[dict, dict[str, str]]:
    """lm-eval's task dict for `tasks` and, per task, where its documents come from."""
    manager = _task_manager()
    with _quiet_lm_eval():
        if data_root is None:
            loaded = manager.load(list(tasks))
            sources = {name: f"hub {task.config.dataset_path}"
                       + (f"/{task.config.dataset_name}" if task.config.dataset_name else "")
                       for name, task in loaded["tasks"].items()}
            return loaded, sources
        configs, sources = [], {}
        for task in tasks:
            config, sources[task] = _local_config(manager, task, data_root)
            configs.append(config)
        return manager.load(configs), sources


def summarize(results: dict, sources: dict[str, str], limit: int | None) -> dict:
    """Per task: the reported metric (acc_norm where the task has it, else acc), its value,
    stderr, the number of items scored and available, every metric, and the data source."""
    out = {}
    for task, source in sources.items():
        values = results["results"][task]
        metrics = {k.split(",")[0]: v for k, v in values.items()
                   if k.endswith(",none") and "_stderr" not in k}
        metric = "acc_norm" if "acc_norm" in metrics else "acc"
        counts = results["n-samples"][task]
        out[task] = {"metric": metric, "value": metrics[metric],
                     "stderr": values[f"{metric}_stderr,none"],
                     "n": counts["effective"], "n_available": counts["original"],
                     "limit": limit, "metrics": metrics, "source": source,
                     "harness": f"lm-eval {LM_EVAL_VERSION}"}
    return out


def run_tasks(model: torch.nn.Module, tokenizer, tasks: tuple[str, ...],
              limit: int | None = None, data_root: Path | None = None,
              batch_tokens: int = 4096, show_progress: bool = True) -> dict:
    """Zero-shot accuracy of `model` on `tasks` (see `summarize`), the first `limit` items of
    each when given."""
    task_dict, sources = build_tasks(tasks, data_root)
    lm = ModelLM(model, tokenizer, batch_tokens, show_progress)
    with _quiet_lm_eval(logging.INFO if show_progress else logging.ERROR):
        results = evaluate(lm, task_dict, limit=limit, log_samples=False)
    return summarize(results, sources, limit)
