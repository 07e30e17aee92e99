import random

import numpy as np
import pytest
import torch

from gemmakit.errors import GemmakitError
from gemmakit.inference import sampler
from gemmakit.inference.api import LLM
from gemmakit.inference.sampling import SamplingParams
from gemmakit.inference.text import TextStream


def test_top_k_and_top_p_filters():
    logits = np.array([4.0, 3.0, 2.0, 1.0], dtype=np.float32)
    values, ids = sampler.kept(logits, SamplingParams(top_k=2), (logits[:2], np.arange(2), 0.0), None)
    assert values.tolist() == [4.0, 3.0] and ids.tolist() == [0, 1]
    probs = torch.tensor(logits).softmax(-1)  # 0.644, 0.237, 0.087, 0.032
    kept = ~np.isinf(sampler.apply_top_p(logits, 0.8))
    assert kept.tolist() == [True, True, False, False]
    assert probs[:1].sum() < 0.8 <= probs[:2].sum()
    assert (~np.isinf(sampler.apply_top_p(logits, 0.5))).tolist() == [True, False, False, False]
    assert (~np.isinf(sampler.apply_min_p(logits, 0.3))).tolist() == [True, True, False, False]  # 0.37 >= 0.3


def test_bad_sampling_params():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(top_p=1.5)):
        with pytest.raises(GemmakitError):
            SamplingParams(**bad)


class _ByteTokenizer:
    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_holds_partial_utf8_and_stop_strings():
    ts = TextStream(_ByteTokenizer(), stop=["END"])
    out = [ts.push(b) for b in "é".encode()]  # two bytes: nothing until complete
    assert out == ["", "é"]
    assert ts.push(ord("E")) == ""  # could be the start of END
    assert ts.push(ord("x")) == "Ex"
    ts.push(ord("E")), ts.push(ord("N")), ts.push(ord("D"))
    assert ts.stopped and ts.text == "éEx"


def test_seeded_sampling_is_reproducible_and_batch_independent(bundled):
    llm = LLM(loaded=bundled)
    p = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=1234, max_tokens=12)
    alone = llm.generate("Once upon a time", p)[0].outputs[0].token_ids
    again = llm.generate("Once upon a time", p)[0].outputs[0].token_ids
    batched = llm.generate(["A different, longer prompt about trains and stations", "Once upon a time"], p)
    assert alone == again == batched[1].outputs[0].token_ids


def test_batch_equals_prompts_one_at_a_time(bundled):
    llm = LLM(loaded=bundled)
    prompts = ["The capital of France is", "def add(a, b):", "Hello", "1, 2, 3, 4,"]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    batch = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    single = [llm.generate(p, greedy)[0].outputs[0].token_ids for p in prompts]
    assert batch == single


def test_stop_string_and_finish_reasons(bundled):
    llm = LLM(loaded=bundled)
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=30, stop=["."]))
    assert out[0].outputs[0].finish_reason == "stop" and "." not in out[0].outputs[0].text
    out = llm.generate("Count: 1, 2, 3,", SamplingParams(temperature=0, max_tokens=5))
    assert out[0].outputs[0].finish_reason == "length" and len(out[0].outputs[0].token_ids) == 5


def test_prompt_longer_than_context_is_an_error(bundled):
    llm = LLM(loaded=bundled)
    too_long = [2] + [236743] * bundled.config.max_position_embeddings
    with pytest.raises(GemmakitError, match="context is 32768 tokens"):
        llm.generate([too_long], SamplingParams(max_tokens=4))


def test_sampling_respects_top_k_and_top_p_support():
    from gemmakit.inference.sampling import sample

    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    top5 = set(torch.topk(logits, 5).indices.tolist())
    gen = random.Random(1)
    seen = {sample(logits, SamplingParams(temperature=1.0, top_k=5), gen) for _ in range(300)}
    assert seen <= top5 and len(seen) > 1
    probs = logits.softmax(-1)
    order = torch.argsort(probs, descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.5).sum()) + 1].tolist())
    seen = {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), gen) for _ in range(300)}
    assert seen <= nucleus


def test_check_length_clamps_to_the_room_and_names_the_prompt():
    from gemmakit.errors import ContextLengthError
    from gemmakit.inference.engine import check_length

    assert check_length(10, None, 16) == 6
    assert check_length(10, 4, 16) == 4 and check_length(10, 100, 16) == 6
    with pytest.raises(ContextLengthError, match="the conversation has 16 tokens; the model's context is 16"):
        check_length(16, 1, 16, "conversation")
    assert issubclass(ContextLengthError, GemmakitError)  # the CLI prints it as a user error


def test_left_pad_aligns_rows_on_the_right():
    from gemmakit.inference.engine import left_pad

    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_request_generator_seeding():
    import random

    from gemmakit.inference.sampling import request_generator

    def draws(gen):
        return [gen.random() for _ in range(4)]

    own = SamplingParams(seed=5)
    # A request's own seed wins, whatever the seed source, and is Python's stream for it.
    assert draws(request_generator(own, None)) == draws(request_generator(own, random.Random(1)))
    assert draws(request_generator(own, None)) == draws(random.Random(5))
    assert draws(request_generator(SamplingParams(seed=-5), None)) != draws(random.Random(5))
    # Without one, a seeded source (an LLM's seed) makes the sequence of requests reproducible...
    src_a, src_b = random.Random(0), random.Random(0)
    first = [draws(request_generator(SamplingParams(), src_a)) for _ in range(2)]
    assert first == [draws(request_generator(SamplingParams(), src_b)) for _ in range(2)]
    assert first[0] != first[1]
    # ...and no source (a server request without a seed) is random.
    assert draws(request_generator(SamplingParams(), None)) != draws(
        request_generator(SamplingParams(), None)
    )


def test_finish_step_ends_a_request_on_a_stop_string_and_flushes_its_text():
    from gemmakit.inference.engine import Request
    from gemmakit.inference.text import finish_step, text_streams

    requests = [Request([1], SamplingParams(stop=["END"])), Request([1], SamplingParams(stop=["Z"]))]
    streams = text_streams(_ByteTokenizer(), requests)
    events = finish_step([(0, ord("a")), (1, ord("b"))], requests, streams)
    assert [(e.index, e.delta, e.finish_reason) for e in events] == [(0, "a", None), (1, "b", None)]
    events = finish_step([(0, ord("E")), (1, ord("c"))], requests, streams)
    assert [e.delta for e in events] == ["", "c"]  # "E" may begin "END": held back
    requests[1].finish_reason = "length"  # as generate_steps marks a row's last token
    events = finish_step([(0, ord("N")), (1, ord("Z"))], requests, streams)
    assert (events[1].delta, events[1].finish_reason) == ("", "length")  # the stop string is cut
    events = finish_step([(0, ord("D"))], requests, streams)
    assert (events[0].delta, events[0].finish_reason) == ("", "stop")
    assert [s.text for s in streams] == ["a", "bc"]
    requests = [Request([1], SamplingParams(stop=["END"]))]
    streams = text_streams(_ByteTokenizer(), requests)
    finish_step([(0, ord("E"))], requests, streams)
    requests[0].finish_reason = "length"
    events = finish_step([(0, ord("N"))], requests, streams)
    assert (events[0].delta, events[0].finish_reason) == ("EN", "length")  # held-back text flushed


def test_logprobs_are_the_raw_log_softmax_and_processor_steers_sampling():
    # sample_row records log-softmax of the model's logits (before the processor) and samples
    # from the processed ones: a processor that forbids the argmax must change the token.
    from gemmakit.inference.engine import Request, sample_row
    from gemmakit.inference.sampling import SamplingParams

    logits = torch.tensor([0.5, 3.0, 1.0, -2.0])
    banned = int(logits.argmax())

    def forbid(_ids, row):
        return row.masked_fill(torch.arange(len(row)) == banned, float("-inf"))

    req = Request([0], SamplingParams(temperature=0), logits_processor=forbid, logprobs=2)
    token = sample_row(logits, req)
    expected = torch.log_softmax(logits, -1)
    assert token == 2 and req.output_ids == [2]
    assert req.output_logprobs[0].logprob == pytest.approx(float(expected[2]))
    assert [t for t, _ in req.output_logprobs[0].top] == [1, 2]
    assert req.output_logprobs[0].top[0][1] == pytest.approx(float(expected[1]))


def test_top_p_on_candidates_keeps_what_a_full_sort_keeps():
    """Top-p without top-k decides on the best 1,024 (or 16,384) tokens when they hold p of the
    mass and sorts the whole row otherwise: each gives the full sort's set."""
    from gemmakit.inference.sampling import probabilities

    gen = torch.Generator().manual_seed(0)
    for scale in (8.0, 3.0, 0.01):  # peaked: 1,024 candidates; flatter: 16,384; flat: a sort
        logits = torch.randn(262_144, generator=gen) * scale
        params = SamplingParams(temperature=1.0, top_p=0.9)
        order = torch.argsort(logits, descending=True, stable=True)
        full = torch.full_like(logits, float("-inf"))
        full[order] = torch.from_numpy(sampler.apply_top_p(logits[order].numpy(), 0.9))
        expected = torch.where(torch.isinf(full), torch.zeros(()), full.softmax(-1))
        got = probabilities(logits, params)
        # The same set up to float32 cumulative rounding at the boundary, deep in a flat tail.
        kept, expected_kept = int((got > 0).sum()), int((~torch.isinf(full)).sum())
        assert abs(kept - expected_kept) <= max(1, expected_kept // 500), (scale, kept, expected_kept)
        assert 0.5 * float((got - expected).abs().sum()) < 1e-3, scale
