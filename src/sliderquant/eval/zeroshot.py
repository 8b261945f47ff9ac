"""lm-eval tasks (zero-shot accuracy and any other task) through EleutherAI's harness.

lm-eval supplies the tasks (prompts, answer choices, metrics, stderr); `ModelLM` scores
lm-eval's (context, continuation) requests with our in-memory model exactly as lm-eval's
own `HFLM` does: context and continuation are tokenized together and split (trailing
spaces of the context move to the continuation), the input is truncated from the left at
the model's context, and a continuation's score is the sum of its tokens' log-probabilities.
Two things save time without changing a number: the choices of one question run their
shared context once and their continuations on copies of its key/value cache, and the
output head runs only on the positions being scored. Rolling log-likelihoods use lm-eval's
own disjoint windows; generation tasks (GSM8K, ...) run `model.generate` one request at a
time, greedy unless the task asks to sample, cut at the task's stop strings.

The six commonsense tasks read the data root's copies (`zeroshot_data`) when there is a
data root; every other task (and the six without a data root) reads lm-eval's own hub
datasets. Importing this module needs lm-eval (`pip install "sliderquant[eval]"`).
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import __version__ as LM_EVAL_VERSION
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.evaluator import evaluate
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from tqdm.auto import tqdm
from transformers import StoppingCriteria

from sliderquant.config import ConfigError
from sliderquant.data import hub_error
from sliderquant.eval.zeroshot_data import TASKS, ZEROSHOT_DIR, local_rows

__all__ = ["LM_EVAL_VERSION", "TASKS", "ModelLM", "build_tasks", "check_tasks", "run_tasks",
           "summarize"]
MAX_GEN_TOKENS = 256  # lm-eval's default for generation tasks that do not set max_gen_toks


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
        # transformers 5 renamed the key/value cache argument (and output) to `cache`
        parameters = inspect.signature(self._decoder.forward).parameters
        self._cache = "cache" if "cache" in parameters else "past_key_values"

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

    @torch.inference_mode()
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
            cache = getattr(out, self._cache)
            cache.batch_repeat_interleave(len(members))
            ids = torch.zeros(len(members), width, dtype=torch.long)
            for row, (_, continuation) in enumerate(members):
                ids[row, :len(continuation) - 1] = torch.tensor(continuation[:-1])
            hidden = self._decoder(input_ids=ids.to(self._device), use_cache=True,
                                   **{self._cache: cache}).last_hidden_state
        for row, (index, continuation) in enumerate(members):
            positions = last if len(continuation) == 1 else torch.cat(
                [last, hidden[row, :len(continuation) - 1]])
            yield index, self._score(positions, continuation)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, over lm-eval's disjoint rolling windows of the
        model's context (as `HFLM`)."""
        results = []
        for (string,) in tqdm([r.args for r in requests], desc="rolling loglikelihood",
                              disable=disable_tqdm or not self.show_progress):
            windows = [(None, *lm_utils.make_disjoint_window(w))
                       for w in lm_utils.get_rolling_token_windows(
                           token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                           max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
            results.append(sum(score for score, _ in scores))
        return results

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, one request at a time: greedy unless the task sets
        `do_sample`, at most `max_gen_toks` tokens, cut at the first stop string."""
        eos = self.tokenizer.decode([self.eot_token_id])
        results = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="generate",
                                        disable=disable_tqdm or not self.show_progress):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), MAX_GEN_TOKENS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ConfigError(f"the task generates up to {max_new} tokens, more than the "
                                  f"model's context of {self.max_length}")
            if not kwargs.get("do_sample"):
                kwargs = {k: v for k, v in kwargs.items()
                          if k not in ("temperature", "top_p", "top_k", "do_sample")}
            ids = torch.tensor([self.tok_encode(context)[-(self.max_length - max_new):]],
                               device=self._device)
            output = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                stopping_criteria=[_StopStrings(self.tokenizer, until, ids.shape[1])],
                pad_token_id=self.eot_token_id, **kwargs)
            text = self.tokenizer.decode(output[0, ids.shape[1]:].tolist(),
                                         skip_special_tokens=True)
            results.append(postprocess_generated_text(text, until, None))
        return results


class _StopStrings(StoppingCriteria):
    """Stop once the generated text (from position `start` on) contains a stop string."""

    def __init__(self, tokenizer, stops: list[str], start: int):
        self.tokenizer, self.stops, self.start = tokenizer, [s for s in stops if s], start

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = [any(s in self.tokenizer.decode(row[self.start:].tolist()) for s in self.stops)
                for row in input_ids]
        return torch.tensor(done, device=input_ids.device)


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
# instead of the ~25 s of all of lm-eval's task folders (done only for other tasks).
_TASK_FOLDERS = ("piqa", "arc", "hellaswag", "winogrande", "super_glue/boolq")


@cache
def _task_manager(every_task: bool = False) -> TaskManager:
    if every_task:
        return TaskManager()
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    return TaskManager(include_defaults=False, include_path=[root / f for f in _TASK_FOLDERS])


def check_tasks(tasks: tuple[str, ...]) -> None:
    """ConfigError for names lm-eval does not know; indexes all of lm-eval's tasks (~25 s)
    only when a task is not one of the six."""
    others = [t for t in tasks if t not in TASKS]
    if not others:
        return
    with _quiet_lm_eval():
        known = set(_task_manager(every_task=True).all_tasks)
    unknown = [t for t in others if t not in known]
    if unknown:
        raise ConfigError(f"--tasks: lm-eval {LM_EVAL_VERSION} has no task {', '.join(unknown)}"
                          "; `lm-eval ls tasks` lists them (wikitext2 and c4 are sliderquant's "
                          "perplexity sets)")


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


def _hub_tasks(tasks: list[str], data_root: Path | None) -> tuple[dict, dict[str, str]]:
    """lm-eval's tasks with their own (hub) data; a DataError naming the data root when the
    hub does not provide it."""
    manager = _task_manager(every_task=any(t not in TASKS for t in tasks))
    try:
        loaded = manager.load(tasks)
    except Exception as e:  # the hub unreachable, a dataset gone: datasets raises many types
        local = (f"the data root {data_root} has local copies of {', '.join(TASKS)} only "
                 f"(under {ZEROSHOT_DIR}/)" if data_root else
                 f"pass --data-dir DIR (or set $SLIDERQUANT_DATA) to read {', '.join(TASKS)} "
                 "from a data root")
        raise hub_error(f"the data of lm-eval task(s) {', '.join(tasks)}", e,
                        f"{local}; other tasks need the hub") from e
    sources = {name: f"hub {task.config.dataset_path}"
               + (f"/{task.config.dataset_name}" if task.config.dataset_name else "")
               for name, task in loaded["tasks"].items()}
    return loaded, sources


def _merge(into: dict, other: dict) -> None:
    """Add the tasks, groups and group map of one lm-eval task dict to another."""
    for key, value in other.items():
        into[key] = {**into.get(key, {}), **value}


def build_tasks(tasks: tuple[str, ...], data_root: Path | None) -> tuple[dict, dict[str, str]]:
    """lm-eval's task dict for `tasks` and, per task, where its documents come from: the
    data root's copy for the six local tasks when there is a data root, else the hub."""
    local = [t for t in tasks if data_root is not None and t in TASKS]
    hub = [t for t in tasks if t not in local]
    with _quiet_lm_eval():
        task_dict, sources = {}, {}
        if hub:
            loaded, sources = _hub_tasks(hub, data_root)
            _merge(task_dict, loaded)
        if local:
            manager = _task_manager()
            configs = []
            for task in local:
                config, sources[task] = _local_config(manager, task, data_root)
                configs.append(config)
            _merge(task_dict, manager.load(configs))
        return task_dict, sources


def summarize(results: dict, sources: dict[str, str], limit: int | None) -> dict:
    """Per task: the reported metric (acc_norm where the task has it, else acc, else the
    task's first metric), its value, stderr, the number of items scored and available, every
    metric (named `metric` or, for filtered metrics, `metric,filter`), and the data source."""
    out = {}
    for task, source in sources.items():
        values = results["results"][task]
        keys = {k.removesuffix(",none"): k for k in values
                if "," in k and "_stderr," not in k}
        metric = next((m for m in ("acc_norm", "acc") if m in keys), next(iter(keys)))
        name, _, kind = keys[metric].partition(",")
        counts = results["n-samples"][task]
        out[task] = {"metric": metric, "value": values[keys[metric]],
                     "stderr": values.get(f"{name}_stderr,{kind}"),
                     "n": counts["effective"], "n_available": counts["original"],
                     "limit": limit, "metrics": {m: values[k] for m, k in keys.items()},
                     "source": source, "harness": f"lm-eval {LM_EVAL_VERSION}"}
    return out


def run_tasks(model: torch.nn.Module, tokenizer, tasks: tuple[str, ...],
              limit: int | None = None, data_root: Path | None = None,
              batch_tokens: int = 4096, show_progress: bool = True) -> dict:
    """Scores of `model` on lm-eval `tasks` (see `summarize`), the first `limit` items of
    each when given."""
    check_tasks(tasks)
    task_dict, sources = build_tasks(tasks, data_root)
    lm = ModelLM(model, tokenizer, batch_tokens, show_progress)
    with _quiet_lm_eval(logging.INFO if show_progress else logging.ERROR):
        results = evaluate(lm, task_dict, limit=limit, log_samples=False)
    return summarize(results, sources, limit)
