"""Speculative decoding (gemmakit/inference/speculative.py) and the KV-cache rollback under it."""

import json
import random

import pytest
import torch

from gemmakit.errors import GemmakitError
from gemmakit.inference import c_decode, sampler, speculative
from gemmakit.inference.engine import Request, generate_steps
from gemmakit.inference.proposers import Backoff, NgramProposer, cache_rows, feed
from gemmakit.inference.sampling import SamplingParams
from gemmakit.kernels import cpu as cpu_kernels
from gemmakit.model.cache import RING_SLACK
from tests.test_model import paired

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler here")


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- rollback ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])  # windows of 4, far shorter than the run
def test_rollback_then_redecode_equals_never_having_decoded(family, hf_folder):
    """Each step writes the true next token and k rejected ones (k up to RING_SLACK, so the
    ring wraps over itself), rolls the k back and goes on: every logit row equals the plain
    cache's, and the cache's bookkeeping ends where the plain one's does."""
    model, _ = paired(hf_folder, family)
    prompt, tokens = torch.tensor([_tokens(9, 0)]), _tokens(60, 1)
    with torch.inference_mode():
        spec, plain = model.make_cache(1, 90, ring_slack=RING_SLACK), model.make_cache(1, 90)
        model(prompt, cache=spec), model(prompt, cache=plain)
        for step, token in enumerate(tokens):
            rejected = _tokens([0, 1, 3, RING_SLACK][step % 4], 100 + step)
            got = model(torch.tensor([[token] + rejected]), cache=spec)[0, 0]
            spec.rollback(len(rejected))
            want = model(torch.tensor([[token]]), cache=plain)[0, -1]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert spec.length == plain.length and torch.equal(spec.valid, plain.valid)
        sliding = spec.groups["sliding_attention"]
        assert sliding.capacity == 4 + RING_SLACK and spec.length > sliding.capacity  # wrapped


def test_rollback_refuses_what_the_ring_cannot_restore(hf_folder):
    model, _ = paired(hf_folder, "gemma3")
    with torch.inference_mode():
        cache = model.make_cache(1, 80, ring_slack=2)
        model(torch.tensor([_tokens(30, 0)]), cache=cache)
        with pytest.raises(ValueError, match="at most 3"):
            cache.rollback(4)
        cache.rollback(3)
        assert cache.length == 27 and not cache.valid[0, 27:].any()
        with pytest.raises(ValueError, match="cannot roll back"):
            cache.rollback(28)


@needs_kernel
def test_c_steps_on_a_rolled_back_cache_with_slack_equal_torch(hf_folder):
    """The batched C step runs 1 + k rows of a one-row cache whose rings have slack and were
    rolled back (the ring wraps: window 4 + 16 slots, 60 columns): its logits are the torch
    model's on a cache that never held the rejected rows."""
    model, _ = paired(hf_folder, "gemma3")
    prompt, tokens = torch.tensor([_tokens(2, 0)]), _tokens(40, 1)
    with torch.inference_mode():
        spec, plain = model.make_cache(1, 80, ring_slack=RING_SLACK), model.make_cache(1, 80)
        model(prompt, cache=spec), model(prompt, cache=plain)
        rows_step = cache_rows(model, spec)
        assert rows_step is not None
        for step, token in enumerate(tokens):
            rejected = _tokens([0, 2, RING_SLACK][step % 3], 50 + step)
            got = feed(model, spec, rows_step, [token] + rejected)[0].clone()
            spec.rollback(len(rejected))
            want = model(torch.tensor([[token]]), cache=plain)[0, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        fast = c_decode.decoder(model, spec, 1)  # the one-row step goes on from there
        for token in _tokens(5, 2):
            torch.testing.assert_close(
                fast.step(token)[0], model(torch.tensor([[token]]), cache=plain)[0, -1], rtol=1e-4, atol=1e-4
            )
    assert spec.length == plain.length and torch.equal(spec.valid, plain.valid)


# --- speculative generation on tiny random models -----------------------------------------


def _run(model, prompts, draft=None, **params):
    """Each prompt's output ids (and its requests) through speculative.generate_steps."""
    requests = [
        Request(p, SamplingParams(**params), stop_ids=(1,), generator=_gen(i)) for i, p in enumerate(prompts)
    ]
    steps = list(speculative.generate_steps(model, requests, draft))
    assert all(len(step) == 1 for step in steps)
    return [r.output_ids for r in requests], requests


def _plain(model, prompts, **params):
    requests = [
        Request(p, SamplingParams(**params), stop_ids=(1,), generator=_gen(i)) for i, p in enumerate(prompts)
    ]
    for request in requests:  # one at a time: no padding, the same maths as speculation's
        list(generate_steps(model, [request]))
    return [r.output_ids for r in requests]


def _gen(seed: int) -> torch.Generator:
    return random.Random(seed)


def _copy_heavy_prompts() -> list[list[int]]:
    """Prompts that repeat themselves (so n-grams find continuations) and random ones."""
    prompts = []
    for seed in range(6):
        block = _tokens(5 + seed, seed)
        prompts.append(block * 4 + block[:2])
    return prompts[:4] + [_tokens(3 + 4 * seed, 50 + seed) for seed in range(3)]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A Gemma 3 target (window 4) and, as its draft, a different random Gemma 2 model with
    the same 256-token vocabulary (so the draft's proposals are mostly rejected)."""
    from gemmakit.loading import ModelSource, load_model
    from tests.conftest import random_hf_model

    models = {}
    for family, seed in (("gemma3", 0), ("gemma2", 7)):
        folder = tmp_path_factory.mktemp(family)
        random_hf_model(family, seed=seed).save_pretrained(folder)
        models[family] = load_model(ModelSource("hf", folder, family))
    return models["gemma3"], models["gemma2"]


@pytest.mark.parametrize("mode", ["ngram", "draft"])
@pytest.mark.parametrize("k", [3, RING_SLACK])
def test_greedy_output_is_plain_greedy(mode, k, tiny_models):
    target, draft = tiny_models
    prompts = _copy_heavy_prompts()
    want = _plain(target, prompts, temperature=0, max_tokens=24, ignore_eos=True)
    got, requests = _run(
        target, prompts, draft if mode == "draft" else None,
        temperature=0, max_tokens=24, ignore_eos=True, speculative=mode, num_speculative_tokens=k,
    )  # fmt: skip
    assert got == want
    stats = [r.speculation for r in requests]
    assert all(s.generated == 23 and s.accepted <= s.proposed for s in stats)
    assert sum(s.proposed for s in stats) > 0 and sum(s.accepted for s in stats) > 0
    assert all(s.steps < 23 for s in stats if s.accepted)  # fewer forward passes than tokens


def test_greedy_speculation_with_the_target_as_its_own_draft_accepts_everything(tiny_models):
    target, _ = tiny_models
    prompts = _copy_heavy_prompts()[:3]
    want = _plain(target, prompts, temperature=0, max_tokens=30, ignore_eos=True)
    got, requests = _run(
        target, prompts, target, temperature=0, max_tokens=30, ignore_eos=True, speculative="draft",
        num_speculative_tokens=5,
    )  # fmt: skip
    assert got == want
    assert all(r.speculation.acceptance_rate == 1.0 for r in requests)
    assert all(r.speculation.tokens_per_step > 4 for r in requests)


def test_stop_tokens_limits_and_logprobs_match_plain_decoding(tiny_models):
    """A stop token inside an accepted run ends the request there; the limit is exact; the
    logits processor and log-probabilities work per token as in a plain step."""
    target, _ = tiny_models
    prompt = _copy_heavy_prompts()[0]
    plain = _plain(target, [prompt], temperature=0, max_tokens=25, ignore_eos=True)[0]
    stop = plain[10]
    banned = plain[3]

    def ban(_ids, row):
        return row.masked_fill(torch.arange(len(row)) == banned, float("-inf"))

    def run(**spec):
        request = Request(prompt, SamplingParams(temperature=0, max_tokens=25, stop_token_ids=[stop], **spec))
        request.logits_processor, request.logprobs = ban, 2
        list(speculative.generate_steps(target, [request]) if spec else generate_steps(target, [request]))
        return request

    want, got = run(), run(speculative="ngram", num_speculative_tokens=8)
    assert got.output_ids == want.output_ids and got.finish_reason == want.finish_reason
    assert banned not in got.output_ids
    for a, b in zip(got.output_logprobs, want.output_logprobs, strict=True):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_speculative_choice_keeps_the_target_distribution():
    """Proposals drawn from q, kept or resampled, give tokens distributed as p: for a draft's
    q and for the one-hot q of an n-gram proposal (total variation over 20k draws)."""
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04, 0.0, 0.0])
    gen = _gen(0)
    for q in (torch.tensor([0.05, 0.05, 0.3, 0.3, 0.1, 0.1, 0.1, 0.0]), None):
        counts = torch.zeros(8)
        for _ in range(20000):
            proposal = 3 if q is None else sampler.draw_index(q.double().numpy(), gen)
            token, kept = speculative.speculative_choice(p, proposal, q, gen)
            assert kept == (token == proposal)  # a rejected proposal has no residual mass
            counts[token] += 1
        tv = 0.5 * (counts / counts.sum() - p).abs().sum()
        assert tv < 0.015, (q, counts)  # a wrong residual or acceptance rule is off by > 0.05


@pytest.mark.slow  # 1500 generations: minutes
def test_speculative_sampling_matches_the_target_distribution(tiny_models):
    """End to end on a tiny model: the second generated token (the first that speculation
    chooses) follows its exact marginal sum_a p(a) p(b | a), for a draft's proposals."""
    target, draft = tiny_models
    prompt = _tokens(6, 3)
    params = dict(temperature=1.0, top_k=3, max_tokens=2, ignore_eos=True)
    with torch.inference_mode():
        first = probabilities_of(target, [prompt], params)[0]  # (V,)
        support = first.nonzero().flatten().tolist()
        second = probabilities_of(target, [prompt + [a] for a in support], params)  # (|A|, V)
        exact = (first[support, None] * second).sum(0)
    counts = torch.zeros_like(exact)
    for i in range(1500):
        request = Request(
            prompt, SamplingParams(**params, speculative="draft", num_speculative_tokens=2), generator=_gen(i)
        )
        list(speculative.generate_steps(target, [request], draft))
        counts[request.output_ids[1]] += 1
    tv = 0.5 * (counts / counts.sum() - exact).abs().sum()
    assert tv < 0.06, tv  # 9 outcomes, 1500 draws: the expected distance is about 0.03


def probabilities_of(model, prompts, params):
    from gemmakit.inference.sampling import probabilities

    logits = torch.stack([model(torch.tensor([p]))[0, -1] for p in prompts])
    return torch.stack([probabilities(row, SamplingParams(**params)) for row in logits])


def test_draft_mode_without_a_draft_model_is_a_clear_error(tiny_models):
    target, _ = tiny_models
    request = Request([5, 6, 7], SamplingParams(speculative="draft"))
    with pytest.raises(GemmakitError, match="needs a draft model"):
        list(speculative.generate_steps(target, [request]))


def test_bad_speculative_params():
    with pytest.raises(GemmakitError, match="speculative must be one of"):
        SamplingParams(speculative="eagle")
    with pytest.raises(GemmakitError, match=r"num_speculative_tokens must be in \[1, 16\]"):
        SamplingParams(speculative="ngram", num_speculative_tokens=17)


def test_ngram_proposer_prefers_the_longest_latest_match():
    proposer = NgramProposer()
    request = Request([1, 2, 3, 9, 9, 2, 3, 4, 5, 6, 7, 1, 2, 3], SamplingParams())
    assert proposer.propose(request, 3) == ([9, 9, 2], None)  # "1 2 3" was followed by 9 9 2
    request.output_ids += [4]  # "2 3 4": latest match continues with 5 6
    assert proposer.propose(request, 2) == ([5, 6], None)
    request.output_ids += [8]  # nothing ends in 8 before: no proposal
    assert proposer.propose(request, 4) == ([], None)


def test_backoff_stops_proposing_when_proposals_fail_and_recovers():
    backoff = Backoff(8)
    assert backoff.budget() == 8
    waits = []
    for _ in range(8):  # every try rejected: ever longer pauses, up to MAX_WAIT steps
        backoff.update(0, backoff.k)
        wait = 0
        while backoff.budget() == 0:
            wait += 1
        waits.append(wait)
    assert waits == [1, 2, 4, 8, 16, 32, 64, 64] and backoff.k == 1
    for _ in range(4):  # accepted runs: the proposal length grows back, pauses shrink
        backoff.update(backoff.k, backoff.k)
    assert backoff.k == 8 and backoff.penalty == 4


def test_a_draft_with_another_vocabulary_is_refused(tiny_models):
    from types import SimpleNamespace

    from gemmakit.inference.proposers import check_draft

    target, draft = tiny_models
    pieces = [f"p{i}" for i in range(256)]

    def tok(p):
        return SimpleNamespace(pieces=p, vocab_size=len(p))

    check_draft(target, tok(pieces), draft, tok(list(pieces)))
    with pytest.raises(GemmakitError, match="not the target's"):
        check_draft(target, tok(pieces), draft, tok(pieces[:-1] + ["other"]))


# --- the CLI on the bundled model ---------------------------------------------------------


def test_generate_speculative_ngram_json_gives_plain_greedy_tokens(capsys):
    from gemmakit.cli import main

    prompt = "Repeat exactly: one two three four five six seven eight. one two three four"
    argv = ["generate", prompt, "--greedy", "--max-new-tokens", "12", "--json"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(argv + ["--speculative", "ngram", "--num-speculative", "4"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["outputs"][0]["token_ids"] == plain["outputs"][0]["token_ids"]
    total = spec["speculation"]
    assert total == spec["outputs"][0]["speculation"] and total["generated"] == 11
    assert 0 <= total["acceptance_rate"] <= 1 and total["tokens_per_step"] >= 1
    assert "speculation" not in plain


def test_generate_speculative_flag_mistakes_are_one_line_errors(capsys):
    from gemmakit.cli import main

    assert main(["generate", "x", "--speculative", "draft"]) == 2
    assert "--speculative draft needs --draft-model" in capsys.readouterr().err
    assert main(["generate", "x", "--speculative", "ngram", "--num-speculative", "40"]) == 2
    err = capsys.readouterr().err
    assert "num_speculative_tokens must be in [1, 16]" in err and "Traceback" not in err


@pytest.mark.parametrize("mode", ["ngram", "draft"])
def test_seeded_speculative_sampling_is_reproducible(mode, tiny_models):
    target, draft = tiny_models
    prompts = _copy_heavy_prompts()[:2]
    params = dict(temperature=0.8, top_p=0.9, max_tokens=16, ignore_eos=True, speculative=mode)
    first, requests = _run(target, prompts, draft, **params)
    again, _ = _run(target, prompts, draft, **params)
    assert first == again and all(len(ids) == 16 for ids in first)
    # each step gives its kept proposals and one token of its own; the prefill gives the first
    assert all(
        r.speculation.generated == 15 == r.speculation.steps + r.speculation.accepted for r in requests
    )
