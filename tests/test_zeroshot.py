"""Zero-shot evaluation through lm-eval, on stories260K with a few local items."""

import json
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_model

from sliderquant import api
from sliderquant.cli import main
from sliderquant.cli.options import parse_tasks
from sliderquant.config import ConfigError
from sliderquant.eval.zeroshot_data import TASKS, local_rows


@pytest.fixture(scope="module")
def stories(data_root):
    return api.load("stories260k", data_root)


def _direct_piqa(model, tokenizer, docs):
    """acc and acc_norm of PIQA computed by hand: one unpadded forward per choice."""
    acc, acc_norm = [], []
    for doc in docs:
        context = f"Question: {doc['goal']}\nAnswer:"
        scores = []
        for choice in (doc["sol1"], doc["sol2"]):
            whole = tokenizer.encode(context + " " + choice)
            n_context = len(tokenizer.encode(context))
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole])).logits[0].float()
            logprobs = torch.log_softmax(logits[:-1], -1)
            targets = torch.tensor(whole[1:])
            scores.append(logprobs.gather(-1, targets[:, None])[n_context - 1:].sum().item())
        lengths = np.array([len(doc["sol1"]), len(doc["sol2"])], dtype=float)
        acc.append(float(np.argmax(scores) == doc["label"]))
        acc_norm.append(float(np.argmax(np.array(scores) / lengths) == doc["label"]))
    return sum(acc) / len(acc), sum(acc_norm) / len(acc_norm)


def test_every_task_reads_its_local_copy(data_root):
    counts = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 1000,
              "winogrande": 1267, "boolq": 3270}
    for task in TASKS:
        split, rows, _ = local_rows(task, data_root)
        assert len(rows) == counts[task], task
        assert split == ("test" if task.startswith("arc") else "validation")
    _, rows, _ = local_rows("arc_easy", data_root)
    assert rows[1]["answerKey"] == "B" and rows[1]["choices"]["text"][1] == "breathing mask"


def test_scores_equal_one_unpadded_forward_per_request():
    from sliderquant.eval.zeroshot import ModelLM

    model = tiny_model()  # context 256 positions
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(0, 96, (n,), generator=g).tolist()

    shared = tokens(20)
    requests = [(("", ""), shared, tokens(n)) for n in (1, 4, 2, 1)]  # choices of one question
    requests += [(("", ""), tokens(n), tokens(m)) for n, m in ((5, 3), (30, 1), (12, 7))]
    requests.append((("", ""), tokens(300), tokens(6)))  # cut from the left at 257 tokens
    lm = ModelLM(model, tokenizer=None, batch_tokens=40, show_progress=False)
    got = lm._loglikelihood_tokens(requests)
    for (_, context, continuation), (score, greedy) in zip(requests, got, strict=True):
        whole = (context + continuation)[-257:]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0, -len(continuation):]
        logprobs = torch.log_softmax(logits.float(), -1)
        target = torch.tensor(continuation)
        assert score == pytest.approx(logprobs.gather(-1, target[:, None]).sum().item(),
                                      abs=1e-4)
        assert greedy == bool((logprobs.argmax(-1) == target).all())


def test_adapter_agrees_with_a_direct_computation(stories, data_root):
    # A small batch budget forces several right-padded batches.
    r = api.evaluate_zeroshot(stories.model, stories.tokenizer, ("piqa",), limit=12,
                              data_dir=data_root, show_progress=False, batch_tokens=300)
    _, rows, _ = local_rows("piqa", data_root)
    acc, acc_norm = _direct_piqa(stories.model, stories.tokenizer, rows[:12])
    piqa = r["piqa"]
    assert piqa["metrics"]["acc"] == pytest.approx(acc)
    assert piqa["metrics"]["acc_norm"] == pytest.approx(acc_norm)
    assert piqa["metric"] == "acc_norm" and piqa["value"] == piqa["metrics"]["acc_norm"]
    assert piqa["stderr"] == pytest.approx(np.std([1.0] * round(12 * acc_norm)
                                                  + [0.0] * round(12 * (1 - acc_norm)),
                                                  ddof=1) / np.sqrt(12))
    assert (piqa["n"], piqa["n_available"], piqa["limit"]) == (12, 1838, 12)
    assert piqa["source"].startswith("local piqa/valid.jsonl")


def test_metric_is_acc_norm_where_the_task_has_it(stories, data_root):
    r = api.evaluate_zeroshot(stories.model, stories.tokenizer, ("arc_challenge", "boolq"),
                              limit=3, data_dir=data_root, show_progress=False)
    assert r["arc_challenge"]["metric"] == "acc_norm"
    assert set(r["arc_challenge"]["metrics"]) == {"acc", "acc_norm"}
    assert r["boolq"]["metric"] == "acc" and set(r["boolq"]["metrics"]) == {"acc"}
    assert all(v["n"] == 3 and 0 <= v["value"] <= 1 for v in r.values())


def test_eval_command_with_limit(stories, data_root, tmp_path, capsys):
    out = tmp_path / "zs.json"
    assert main(["eval", "stories260k", "--data-dir", str(data_root), "--tasks",
                 "winogrande,hellaswag", "--limit", "4", "--quiet", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "first 4 of 1267 items (--limit 4)" in printed
    assert "first 4 of 1000 items (--limit 4)" in printed
    record = json.loads(out.read_text())
    assert record["limit"] == 4 and "perplexity" not in record
    assert record["zeroshot"]["winogrande"]["metric"] == "acc"
    assert record["zeroshot"]["hellaswag"]["n"] == 4


def test_task_lists_and_mistakes(capsys, data_root):
    assert parse_tasks("wikitext2,zeroshot") == ("wikitext2", *TASKS)
    assert parse_tasks("piqa,gsm8k") == ("piqa", "gsm8k")  # any lm-eval name, checked later
    with pytest.raises(ConfigError, match="measures perplexity on wikitext2 or c4"):
        parse_tasks("piqa", perplexity_only=True)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "stories260k", "--data-dir", str(data_root), "--tasks", "piqa",
              "--limit", "0"])
    assert exit_.value.code == 2
    assert "argument --limit: 0 must be at least 1" in capsys.readouterr().err
    assert main(["eval", "stories260k", "--data-dir", str(data_root), "--tasks", "piqa",
                 "--kl"]) == 2
    assert "--kl is measured on the perplexity sets" in capsys.readouterr().err


def test_any_lm_eval_task_unknown_or_without_data_is_one_clear_error(capsys, data_root,
                                                                     monkeypatch):
    import datasets
    import huggingface_hub.constants

    assert main(["eval", "stories260k", "--data-dir", str(data_root), "--tasks",
                 "wikitext2,no_such_task"]) == 2
    err = capsys.readouterr().err
    assert "has no task no_such_task" in err and "lm-eval ls tasks" in err
    assert "Traceback" not in err
    # a real lm-eval task with no local copy, while the hub is unreachable
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["eval", "stories260k", "--data-dir", str(data_root), "--tasks",
                 "lambada_openai", "--limit", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "could not load the data of lm-eval task(s) lambada_openai" in err
    assert f"the data root {data_root} has local copies of piqa" in err
    assert len(err.strip().splitlines()) == 1


def test_rolling_and_generation_requests_match_a_direct_computation():
    """loglikelihood_rolling (perplexity-style tasks) and generate_until (GSM8K-style)."""
    from types import SimpleNamespace

    from sliderquant.eval.zeroshot import ModelLM

    model = tiny_model()  # context 256 positions, vocab 96

    class Tokens:  # a tokenizer over the ids themselves: "3 14 15" <-> [3, 14, 15]
        eos_token_id, bos_token_id, bos_token, chat_template = 95, 1, None, None

        def encode(self, text, **_):
            return [int(t) for t in text.split()]

        def decode(self, ids, **_):
            return " ".join(map(str, ids))

        def __call__(self, text, **_):
            return {"input_ids": self.encode(text)}

    lm = ModelLM(model, Tokens(), show_progress=False)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 90, (300,), generator=g).tolist()  # longer than the context
    (rolling,) = lm.loglikelihood_rolling([SimpleNamespace(args=(" ".join(map(str, ids)),))])

    def score(inputs, target):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([inputs])).logits[0, -len(target):]
        return torch.log_softmax(logits.float(), -1).gather(
            -1, torch.tensor(target)[:, None]).sum().item()

    # lm-eval's disjoint windows of the 256-token context: BOS + the first 255 tokens
    # predict tokens 0..255; tokens 43..298 predict tokens 256..299 from their last 44
    direct = score([1, *ids[:255]], ids[:256]) + score(ids[43:299], ids[256:300])
    assert rolling == pytest.approx(direct, rel=1e-4)

    prompt = ids[:10]
    (text,) = lm.generate_until([SimpleNamespace(args=(" ".join(map(str, prompt)),
                                                       {"until": ["no stop"],
                                                        "max_gen_toks": 5}))])
    greedy = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            greedy.append(int(model(input_ids=torch.tensor([greedy])).logits[0, -1].argmax()))
    assert text == " ".join(map(str, greedy[10:]))


def test_scoring_shared_contexts_warns_of_nothing(stories, data_root):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        api.evaluate_zeroshot(stories.model, stories.tokenizer, ("arc_easy",), limit=2,
                              data_dir=data_root, show_progress=False)
    assert not [w for w in caught if "deprecated" in str(w.message)], \
        [str(w.message) for w in caught]


def test_missing_lm_eval_is_a_clear_error(stories, monkeypatch):
    monkeypatch.setitem(sys.modules, "sliderquant.eval.zeroshot", None)
    with pytest.raises(api.MissingExtraError, match=r"sliderquant\[eval\]"):
        api.evaluate_zeroshot(stories.model, stories.tokenizer, ("piqa",), limit=1)
