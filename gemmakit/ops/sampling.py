"""Sampling's pass over whole rows of logits: each row's best candidates and log-sum-exp.

`top_candidates` is what `inference/sampling.py` asks of a row (or of all the rows of a step
at once): the C kernel (kernels/csrc/sample.c) on the CPU, torch's topk and logsumexp
elsewhere. Either way a row's result depends on that row alone, so one row sampled alone and
the same row in a batch draw from the same candidates.
"""

from __future__ import annotations

import torch

from gemmakit.kernels import cpu as cpu_kernels


def top_candidates(
    logits: torch.Tensor, temperature: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For logits (R, V) and temperatures (R,): the `count` largest of each row of logits /
    temperature as (values (R, count) float32, ids (R, count) int64), best first (the C
    kernel breaks ties by the lower id; torch's topk leaves their order to itself), and
    each row's log-sum-exp of logits / temperature (R,) float32."""
    logits = logits.float()
    if logits.device.type == "cpu":
        found = cpu_kernels.sample_candidates(logits.contiguous(), temperature, count)
        if found is not None:
            return found
    # One row at a time: the same reductions whatever the number of rows.
    values, ids, lse = [], [], []
    for row, t in zip(logits, temperature.tolist()):
        scaled = row / t
        v, i = torch.topk(scaled, count)
        values.append(v)
        ids.append(i)
        lse.append(torch.logsumexp(scaled, -1))
    return torch.stack(values), torch.stack(ids), torch.stack(lse)
