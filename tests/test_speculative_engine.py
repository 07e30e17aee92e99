"""Speculation per request in the continuous-batching engine (`speculative.EngineSpeculation`):
a speculating row verifies its proposals as rows of its own slot in the same step as the other
rows; greedy tokens are plain greedy's whatever else runs beside them."""

from __future__ import annotations

import random

import pytest

from gemmakit.inference.batching import Engine
from gemmakit.inference.engine import Request
from gemmakit.inference.sampling import SamplingParams
from gemmakit.model.slot_cache import RING_SLACK
from tests.test_batching import CONFIGS, alone, prompt, run, tiny_model

FAMILIES = ["gemma", "gemma3", "gemma4_shared"]  # the C step (1-3) and the torch step (4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: every test of this module on one thread (conftest's `one_thread`)."""


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(CONFIGS[request.param]())


def copy_heavy(n: int, seed: int) -> list[int]:
    block = prompt(n, seed)
    return block * 4 + block[:2]


def params(spec: str | None, k: int = 8, **extra) -> SamplingParams:
    extra = {"temperature": 0, "max_tokens": 20, "ignore_eos": True} | extra
    return SamplingParams(speculative=spec, num_speculative_tokens=k, **extra)


@pytest.mark.parametrize("k", [3, RING_SLACK])
@pytest.mark.parametrize("c_step", [True, False], ids=["c-step-if-any", "torch-step"])
def test_greedy_tokens_equal_plain_with_plain_rows_in_the_same_steps(model, k, c_step):
    """Speculating and plain rows mixed, joining mid-run, prompts past the window: every
    row's tokens are its plain greedy ones, and speculation saved steps."""
    prompts = [copy_heavy(5, 0), prompt(17, 1), copy_heavy(7, 2), prompt(30, 3), copy_heavy(3, 4)]
    want = [alone(model, p, params(None)) for p in prompts]
    engine = Engine(model, slots=3, capacity=128, prefill_chunk=8)
    if not c_step:
        engine.fast = None
    specs = ["ngram", None, "ngram", None, "ngram"]
    requests = [Request(p, params(s, k)) for p, s in zip(prompts, specs)]
    run(engine, requests, join_at={1: 1, 2: 2, 3: 6, 4: 7})
    assert [r.output_ids for r in requests] == want
    assert all(r.finish_reason == "length" for r in requests)
    stats = [r.speculation for r in requests]
    assert stats[1] is None and stats[3] is None
    speculating = [s for s in stats if s is not None]
    assert all(s.generated == 19 and s.accepted <= s.proposed for s in speculating)
    assert sum(s.proposed for s in speculating) > 0
    totals = engine.speculation.totals
    assert totals.accepted == sum(s.accepted for s in speculating)
    assert totals.generated == sum(s.generated for s in speculating)


def test_the_target_as_its_own_draft_accepts_everything_in_batched_steps(model):
    prompts = [prompt(6, 0), prompt(11, 1)]
    want = [alone(model, p, params(None)) for p in prompts]
    engine = Engine(model, slots=2, capacity=64, draft=model)
    requests = [Request(prompts[0], params("draft", 5)), Request(prompts[1], params(None))]
    steps = run(engine, requests)
    assert [r.output_ids for r in requests] == want
    assert requests[0].speculation.acceptance_rate == 1.0
    assert requests[0].speculation.tokens_per_step > 4
    assert steps == len(want[1])  # the plain row still decodes one token a step


def test_seeded_sampling_is_reproducible_and_counts_add_up(model):
    def once():
        engine = Engine(model, slots=3, capacity=64)
        requests = [
            Request(copy_heavy(4, i), params("ngram", temperature=0.8, top_p=0.9, max_tokens=16),
                    generator=random.Random(i))
            for i in range(3)
        ]  # fmt: skip
        run(engine, requests)
        return requests

    first, again = once(), once()
    assert [r.output_ids for r in first] == [r.output_ids for r in again]
    for r in first:
        s = r.speculation
        assert len(r.output_ids) == 16 and s.generated == 15 == s.steps + s.accepted


def test_a_stop_token_inside_an_accepted_run_ends_the_row_there(model):
    p = copy_heavy(5, 0)
    plain = alone(model, p, params(None, max_tokens=30))
    stop = plain[12]
    want = Request(p, params(None, max_tokens=30, stop_token_ids=[stop]))
    got = Request(p, params("ngram", max_tokens=30, stop_token_ids=[stop]))
    run(Engine(model, slots=1, capacity=64), [want])
    run(Engine(model, slots=1, capacity=64), [got])
    assert got.output_ids == want.output_ids and got.output_ids[-1] == stop
    assert got.finish_reason == want.finish_reason == "stop"


def test_a_prompt_reusing_a_speculating_rows_slot_decodes_as_plain(model):
    """A finished speculating row wrote rejected positions past what it holds; a prompt that
    continues its text still generates plain greedy tokens, from its cached prefix where the
    rings allow it (always without sliding layers)."""
    first = copy_heavy(6, 5)
    engine = Engine(model, slots=1, capacity=128)
    done = Request(first, params("ngram", RING_SLACK, max_tokens=24))
    run(engine, [done])
    follow = first + done.output_ids[:20] + prompt(3, 9)
    request = Request(follow, params(None))
    run(engine, [request])
    assert request.output_ids == alone(model, follow, params(None))
    if model.config.sliding_window is None:
        assert engine.counters.prefix_hit_tokens == len(first) + 20


def test_cached_tokens_count_the_rejected_positions_written():
    from gemmakit.inference.batching import Sequence
    from gemmakit.inference.speculative import RowSpeculation, cached_tokens

    seq = Sequence(Request([5, 6, 7], params("ngram")), limit=10, held=4)
    seq.request.output_ids = [8, 9]
    assert cached_tokens(seq) == [5, 6, 7, 8]
    seq.request.speculation = RowSpeculation(written=7)
    assert cached_tokens(seq) == [5, 6, 7, 8, -1, -1, -1]


def test_a_speculative_request_the_engine_cannot_run_fails_alone(model):
    """A "draft" request in an engine without a draft model ends with "error"; the plain row
    beside it finishes as it would alone."""
    engine = Engine(model, slots=2, capacity=64)
    bad, good = Request(prompt(5, 0), params("draft")), Request(prompt(6, 1), params(None))
    run(engine, [bad, good])
    assert bad.finish_reason == "error" and len(bad.output_ids) == 1
    assert good.output_ids == alone(model, prompt(6, 1), params(None))


def test_llm_stop_strings_and_logprobs_with_speculation_equal_plain(tmp_path):
    """Through LLM.generate (the engine), with stop strings: text, token ids, finish reasons
    and log-probabilities as plain decoding gives them."""
    from gemmakit.inference.api import LLM
    from tests.test_training import tiny_model_folder

    llm = LLM(model=str(tiny_model_folder(tmp_path)), dtype="float32", device="cpu")
    prompts = [[5, 6, 7, 8, 9] * 4, [11, 12, 13] * 5, [20, 21, 22, 23]]
    base = dict(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2)
    plain = llm.generate(prompts, SamplingParams(**base))
    for out in plain:  # a stop string a few tokens in (where one is found)
        text = out.outputs[0].text
        stop = text[len(text) // 3 : len(text) // 3 + 2].strip() or None
        params = SamplingParams(**base, stop=[stop] if stop else None)
        want = llm.generate([out.prompt_token_ids], params)[0].outputs[0]
        got = llm.generate(
            [out.prompt_token_ids], SamplingParams(**base, stop=params.stop, speculative="ngram")
        )
        got = got[0].outputs[0]
        assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
        assert [list(lp) for lp in got.logprobs] == [list(lp) for lp in want.logprobs]
        assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-4)


class _Letters:
    """A tokenizer whose token i is the letter 'a' + i - 1."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i - 1) for i in ids)


def test_several_tokens_of_a_row_in_one_step_end_it_once():
    from gemmakit.inference.engine import TokenLogprob
    from gemmakit.inference.text import TextStream, finish_step

    def step(stop):
        request = Request([9], params("ngram"), output_ids=[1, 2, 3, 4], finish_reason="length")
        request.output_logprobs = [TokenLogprob(t, -1.0) for t in (1, 2, 3, 4)]
        stream = TextStream(_Letters(), stop)
        return request, finish_step([(0, t) for t in (1, 2, 3, 4)], [request], [stream])

    request, events = step([])
    assert [(e.delta, e.finish_reason) for e in events] == [
        ("a", None),
        ("b", None),
        ("c", None),
        ("d", "length"),
    ]
    assert [e.logprob.token_id for e in events] == [1, 2, 3, 4]
    # a stop string met at the third token ends the row there: "stop", the rest dropped
    request, events = step(["c"])
    assert [(e.delta, e.finish_reason) for e in events] == [("a", None), ("b", None), ("", "stop")]
    assert request.output_ids == [1, 2, 3] and len(request.output_logprobs) == 3
    assert request.finish_reason == "stop"
