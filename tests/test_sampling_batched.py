"""Sampling many rows at once: the C candidate pass (csrc/sample.c through ops.top_candidates)
and `sample_many` / `engine.sample_rows`, which must give each row the token the per-row
path gives for the same generator state."""

from __future__ import annotations

import random

import pytest
import torch

from gemmakit import ops
from gemmakit.inference.engine import Request, sample_row, sample_rows
from gemmakit.inference.sampling import SamplingParams, probabilities, sample, sample_many
from gemmakit.kernels import cpu as cpu_kernels
from gemmakit.kernels.build import FLAGS, compile_library

needs_kernels = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C kernels here")


def logits_rows(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 4 * torch.randn(rows, vocab, generator=gen)


@needs_kernels
@pytest.mark.parametrize("vocab, count", [(262144, 1024), (262144, 16384), (1000, 17), (300, 300), (33, 1)])
def test_candidates_are_torch_topk_with_ties_to_the_lower_id(vocab, count):
    x = logits_rows(3, vocab)
    x[0, 5] = x[0, 2] = x[0].max() + 1  # a tie at the top: the lower id comes first
    x[1, :] = x[1].round()  # many ties everywhere, across the cut at `count` too
    temperature = torch.tensor([0.7, 1.0, 2.5])
    values, ids, lse = cpu_kernels.sample_candidates(x, temperature, count)
    scaled = x / temperature[:, None]
    assert torch.equal(values, torch.topk(scaled, count).values)
    assert torch.equal(scaled.gather(1, ids), values)
    assert ids[0, :2].tolist() == [2, 5][:count]
    raw = x.gather(1, ids)
    for r in range(3):  # ties of the logits (before scaling) in id order, ids distinct
        assert len(set(ids[r].tolist())) == count
        assert bool((raw[r, 1:] <= raw[r, :-1]).all())
        same = raw[r, 1:] == raw[r, :-1]
        assert bool((ids[r, 1:][same] > ids[r, :-1][same]).all())
    torch.testing.assert_close(lse, torch.logsumexp(scaled, -1), rtol=1e-6, atol=1e-5)


@needs_kernels
def test_candidates_when_the_strided_sample_misleads():
    """The kernel guesses its first bin from every 8th logit: 300 high logits all at sampled
    indices make it guess too high (300 < 1024 collected), and the whole row decides."""
    x = torch.zeros(1, 262144)
    x[0, 0:2400:8] = 10.0
    x[0, 5] = 3.0
    values, ids, _ = cpu_kernels.sample_candidates(x, torch.ones(1), 1024)
    assert torch.equal(values, torch.topk(x, 1024).values) and ids[0, 300] == 5
    assert ids[0, :300].tolist() == list(range(0, 2400, 8)) and ids[0, 301:].tolist()[:3] == [1, 2, 3]


@needs_kernels
def test_a_rows_candidates_do_not_depend_on_the_other_rows_or_threads():
    x = logits_rows(7, 262144, seed=1)
    temperature = torch.linspace(0.3, 1.5, 7)
    together = cpu_kernels.sample_candidates(x, temperature, 1024)
    for r in (0, 3, 6):
        alone = cpu_kernels.sample_candidates(x[r : r + 1].contiguous(), temperature[r : r + 1], 1024)
        for a, b in zip(alone, together):
            assert torch.equal(a[0], b[r])


def test_the_scalar_build_picks_the_same_candidates():
    """The loops a CPU without AVX-512 runs: same ids and values, the same lse up to exp's
    rounding (expf against the vector e^x)."""
    lib = compile_library(FLAGS + ("-mno-avx512f",))
    if lib is None or cpu_kernels.library() is None:
        pytest.skip("no compiler")
    vocab, count = 262144, 1024
    x = logits_rows(2, vocab, seed=2)
    temperature = torch.tensor([0.8, 1.3])
    want = cpu_kernels.sample_candidates(x, temperature, count)
    values, ids = torch.empty(2, count), torch.empty(2, count, dtype=torch.int64)
    lse, scratch = torch.empty(2), torch.empty(lib.sample_scratch_words(vocab), dtype=torch.int32)
    lib.sample_candidates(x.data_ptr(), temperature.data_ptr(), vocab, count, values.data_ptr(), ids.data_ptr(),
                          lse.data_ptr(), scratch.data_ptr(), 0, 2)  # fmt: skip
    assert torch.equal(ids, want[1]) and torch.equal(values, want[0])
    torch.testing.assert_close(lse, want[2], rtol=1e-6, atol=1e-6)


def test_the_torch_fallback_gives_the_kernels_values(monkeypatch):
    x = logits_rows(2, 5000, seed=3)
    temperature = torch.tensor([0.5, 1.0])
    monkeypatch.setattr(cpu_kernels, "sample_candidates", lambda *a: None)
    values, ids, lse = ops.top_candidates(x, temperature, 64)
    scaled = x / temperature[:, None]
    assert torch.equal(values, torch.topk(scaled, 64).values) and torch.equal(scaled.gather(1, ids), values)
    torch.testing.assert_close(lse, torch.logsumexp(scaled, -1))


PARAMS = [
    SamplingParams(temperature=0.7, top_p=0.95),
    SamplingParams(temperature=0.7, top_k=40),
    SamplingParams(temperature=1.0, top_k=50, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.2),  # no filter: the whole row
    SamplingParams(temperature=0.9, min_p=0.1),  # min-p alone: a full sort
    SamplingParams(temperature=40.0, top_p=0.99),  # too flat for 1,024 candidates
    SamplingParams(temperature=0.7, top_p=0.95),
]


@pytest.mark.parametrize("vocab", [262144, 700])
def test_sample_many_gives_each_row_its_per_row_token(vocab):
    """Same seeds -> same tokens, row by row, over many steps (the generators advance alike)."""
    for step in range(3 if vocab > 10000 else 6):
        x = logits_rows(len(PARAMS), vocab, seed=10 + step)
        batched_gens = [random.Random(100 + i) for i in range(len(PARAMS))]
        alone_gens = [random.Random(100 + i) for i in range(len(PARAMS))]
        for _ in range(step):  # both sets of generators at the same, advanced state
            for g in batched_gens + alone_gens:
                g.random()
        got = sample_many(x, PARAMS, batched_gens)
        want = [sample(x[i], p, g) for i, (p, g) in enumerate(zip(PARAMS, alone_gens))]
        assert got == want
        assert [g.getstate() for g in batched_gens] == [g.getstate() for g in alone_gens]


def test_sampled_tokens_follow_the_filters():
    x = logits_rows(1, 262144, seed=4)[0]
    params = SamplingParams(temperature=0.7, top_p=0.5)
    kept = probabilities(x, params) > 0
    gen = random.Random(0)
    tokens = sample_many(x.expand(64, -1).contiguous(), [params] * 64, [gen] * 64)
    assert all(bool(kept[t]) for t in tokens) and len(set(tokens)) > 1


def test_a_nan_row_fails_alone():
    x = logits_rows(3, 2000, seed=5)
    x[1] = float("nan")
    params = [SamplingParams(temperature=0.7, top_p=0.9)] * 3
    got = sample_many(x, params, [random.Random(i) for i in range(3)])
    assert isinstance(got[1], Exception) and isinstance(got[0], int) and isinstance(got[2], int)


def test_engine_sample_rows_batches_plain_rows_and_keeps_the_others_per_row():
    """Rows with a logits processor or log-probabilities still go through `sample_row`; every
    row gets sample_row's token and record, and a failing row ends alone."""
    x = logits_rows(4, 3000, seed=6)
    ban = lambda output_ids, logits: logits.index_fill(0, torch.tensor([int(logits.argmax())]), -1e9)  # noqa: E731

    def broken(output_ids, logits):
        raise RuntimeError("processor broke")

    def requests():
        p = SamplingParams(temperature=0.8, top_p=0.9, logprobs=2)
        plain = SamplingParams(temperature=0.8, top_p=0.9)
        return [
            Request([1], plain, generator=random.Random(1)),
            Request([1], plain, generator=random.Random(2), logits_processor=ban),
            Request([1], p, generator=random.Random(3), logprobs=2),
            Request([1], plain, generator=random.Random(4), logits_processor=broken),
        ]

    batched, alone = requests(), requests()
    got = sample_rows(x, batched)
    want = [sample_row(x[i], r) for i, r in enumerate(alone[:3])]
    assert got[:3] == want and isinstance(got[3], RuntimeError)
    assert [r.output_ids for r in batched[:3]] == [r.output_ids for r in alone[:3]]
    assert batched[2].output_logprobs == alone[2].output_logprobs and batched[3].output_ids == []
