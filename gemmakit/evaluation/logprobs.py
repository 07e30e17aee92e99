"""Log-probabilities of target tokens, the step both perplexity and scoring end with.

Log-softmax is always taken in float32, over chunks of positions, because the 262k-entry
vocabulary makes full-sequence float32 logits hundreds of megabytes.
"""

from __future__ import annotations

import torch

# Positions whose logits are materialized at once: 128 x 262144 float32 = 128 MiB.
LOGIT_CHUNK = 128
# Ids per forward pass (rows x longest row, padding included) when batching windows or choices.
BATCH_TOKENS = 4096


@torch.inference_mode()
def target_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = LOGIT_CHUNK):
    """log p(target) and whether each target is the argmax, for hidden states (N, C).

    The logits of at most `chunk` positions exist at a time; log-softmax is computed in
    float32 as logit[target] - logsumexp(logits), which avoids a second (chunk, V) tensor.
    """
    logps, greedy = [], []
    for i in range(0, hidden.shape[0], chunk):
        logits = model.logits(hidden[i : i + chunk]).float()  # (n, V)
        t = targets[i : i + chunk, None]
        logps.append((logits.gather(-1, t)[:, 0] - torch.logsumexp(logits, dim=-1)).double())
        greedy.append(logits.argmax(-1) == t[:, 0])
    if not logps:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    return torch.cat(logps).cpu(), torch.cat(greedy).cpu()


def progress_bar(total: int, desc: str, unit: str, enabled: bool):
    """A tqdm bar over `total` batches' items, shown only when `enabled` and on a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or None, leave=False)
