import pytest
import torch

from gemmakit.errors import GemmakitError
from gemmakit.inference.api import LLM
from gemmakit.inference.engine import SamplingParams, TextStream, apply_top_k, apply_top_p


def test_top_k_and_top_p_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert torch.isinf(apply_top_k(logits, 2)).tolist() == [False, False, True, True]
    probs = logits.softmax(-1)  # 0.644, 0.237, 0.087, 0.032
    kept = ~torch.isinf(apply_top_p(logits, 0.8))
    assert kept.tolist() == [True, True, False, False]
    assert probs[:1].sum() < 0.8 <= probs[:2].sum()
    assert (~torch.isinf(apply_top_p(logits, 0.5))).tolist() == [True, False, False, False]


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
    from gemmakit.inference.engine import sample

    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    top5 = set(torch.topk(logits, 5).indices.tolist())
    gen = torch.Generator().manual_seed(1)
    seen = {sample(logits, SamplingParams(temperature=1.0, top_k=5), gen) for _ in range(300)}
    assert seen <= top5 and len(seen) > 1
    probs = logits.softmax(-1)
    order = torch.argsort(probs, descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.5).sum()) + 1].tolist())
    seen = {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), gen) for _ in range(300)}
    assert seen <= nucleus
