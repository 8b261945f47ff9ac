"""How far a quantized model's next-token distribution is from its FP reference.

Both models run on the same perplexity windows in lockstep (one window at a time, so no
[windows, seqlen, vocab] logits are ever kept). Per predicted position t (the `seqlen - 1`
shifted positions of a window): KL(P_ref,t ‖ Q_t) = Σ_v P_ref(v) (log P_ref(v) − log Q(v)),
in nats, and whether both models' most likely tokens agree. The reported KL is the mean
over all positions of all windows (llama.cpp's `--kl-divergence` "mean KLD"); the same pass
gives both models' perplexities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.inference_mode()
def window_divergence(model, reference, windows: torch.Tensor, desc: str = "kl",
                      show_progress: bool = True, chunk: int = 512) -> dict:
    """{"ppl", "reference_ppl", "kl", "top1_agreement", "positions"} of `model` against
    `reference` on `windows` [n, seqlen]; positions are processed `chunk` at a time."""
    device = next(model.parameters()).device
    ref_device = next(reference.parameters()).device
    nll, ref_nll, kl, agree = [], [], 0.0, 0
    positions = 0
    for row in tqdm(windows, desc=desc, unit="window", disable=not show_progress,
                    dynamic_ncols=True):
        ids = row.unsqueeze(0)
        q_logits = model(input_ids=ids.to(device), use_cache=False).logits[0, :-1]
        p_logits = reference(input_ids=ids.to(ref_device), use_cache=False).logits[0, :-1]
        targets = ids[0, 1:]
        window_nll = window_ref_nll = 0.0
        for start in range(0, targets.numel(), chunk):
            end = min(start + chunk, targets.numel())
            log_q = F.log_softmax(q_logits[start:end].float().cpu(), dim=-1)
            log_p = F.log_softmax(p_logits[start:end].float().cpu(), dim=-1)
            target = targets[start:end, None]
            window_nll -= log_q.gather(-1, target).sum().item()
            window_ref_nll -= log_p.gather(-1, target).sum().item()
            kl += (log_p.exp() * (log_p - log_q)).sum().item()
            agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
        nll.append(window_nll / targets.numel())
        ref_nll.append(window_ref_nll / targets.numel())
        positions += targets.numel()
    return {"ppl": math.exp(sum(nll) / len(nll)),
            "reference_ppl": math.exp(sum(ref_nll) / len(ref_nll)),
            "kl": kl / positions, "top1_agreement": agree / positions, "positions": positions}
