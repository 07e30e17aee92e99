"""The OpenAI API as clients use it: penalties, logit bias, log-probabilities, n > 1, structured
output, tools and /metrics, from SamplingParams up to the official `openai` client."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemmakit.errors import GemmakitError
from gemmakit.inference.logits_processing import RequestLogitsProcessor
from gemmakit.inference.sampling import SamplingParams
from tests.test_training import tiny_model_folder


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from gemmakit.inference.api import LLM

    folder: Path = tiny_model_folder(tmp_path_factory.mktemp("tiny"))
    return LLM(model=str(folder), dtype="float32", device="cpu")


# --- SamplingParams and the logits processor ---------------------------------------------


@pytest.mark.parametrize(
    "values,field",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": {5: 101}}, "logit_bias[5]"),
        ({"logit_bias": {"5": 1}}, "logit_bias"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"n": 0}, "n"),
        ({"n": 2.0}, "n"),
        ({"json_schema": "object"}, "json_schema"),
    ],
)
def test_sampling_params_refuse_bad_openai_fields(values, field):
    with pytest.raises(GemmakitError) as e:
        SamplingParams(**values)
    assert str(e.value).startswith(field), e.value


def test_penalties_match_a_hand_computation():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    prompt, output = [0, 4], [3, 3, 1]
    # Repetition 2 over prompt + output {0, 1, 3, 4}: positive / 2, negative * 2; then the
    # generated counts (3: twice, 1: once) cost 0.5 each and presence 0.25 once; bias last.
    params = SamplingParams(
        repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, logit_bias={2: 1.0, 4: -0.5}
    )
    got = RequestLogitsProcessor(params, prompt)(output, logits)
    expected = [2.0 / 2, -1.0 * 2 - 0.5 - 0.25, 0.5 + 1.0, 3.0 / 2 - 2 * 0.5 - 0.25, -2.0 * 2 - 0.5]
    assert got.tolist() == pytest.approx(expected)
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0, -2.0]  # the raw row is left for logprobs


def test_openai_penalties_count_generated_tokens_only():
    logits = torch.zeros(4)
    got = RequestLogitsProcessor(SamplingParams(frequency_penalty=1.0, presence_penalty=1.0), [1, 1, 2])(
        [2, 2, 2], logits
    )
    assert got.tolist() == [0.0, 0.0, -4.0, 0.0]


def test_logit_bias_plus_100_forces_a_token(tiny_llm):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=6, logit_bias={77: 100}, ignore_eos=True)
    out = tiny_llm.generate([[2, 10, 11]], params)[0].outputs[0]
    assert out.token_ids == [77] * 6
    banned = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = tiny_llm.generate([[2, 10, 11]], banned)[0].outputs[0].token_ids[0]
    banned.logit_bias = {first: -100}
    banned.__post_init__()
    assert tiny_llm.generate([[2, 10, 11]], banned)[0].outputs[0].token_ids[0] != first


def test_logprobs_equal_the_models_log_softmax_teacher_forced(tiny_llm):
    prompt = [2, 30, 31, 32]
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=5, logprobs=3, ignore_eos=True)
    out = tiny_llm.generate([prompt], params)[0].outputs[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logits = tiny_llm.model(ids)[0, len(prompt) - 1 : -1].float()  # (generated, V)
    expected = torch.log_softmax(logits, -1)
    assert len(out.logprobs) == len(out.token_ids) == 5
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert entry[token].logprob == pytest.approx(float(expected[step, token]), abs=1e-4)
        top = torch.topk(expected[step], 3)
        ranked = sorted((lp.rank, t) for t, lp in entry.items() if lp.rank is not None)
        assert [t for _, t in ranked] == top.indices.tolist()
    assert out.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs))
    )


def test_n_completions_per_prompt_differ_and_reproduce(tiny_llm):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=8, n=3, ignore_eos=True)
    first = tiny_llm.generate(["ab", "cd"], params)
    again = tiny_llm.generate(["ab", "cd"], params)
    assert [len(r.outputs) for r in first] == [3, 3]
    assert [o.index for o in first[0].outputs] == [0, 1, 2]
    runs = [o.token_ids for o in first[0].outputs]
    assert len({tuple(r) for r in runs}) > 1  # n samples, not n copies of one
    assert runs == [o.token_ids for o in again[0].outputs]
    # The first completion is the one the seed gives alone.
    alone = tiny_llm.generate(["ab"], SamplingParams(temperature=1.0, seed=11, max_tokens=8, ignore_eos=True))
    assert alone[0].outputs[0].token_ids == runs[0]
    assert first[1].prompt == "cd" and first[0].metrics["generated_tokens"] == 24


def test_greedy_n_gives_n_equal_completions(tiny_llm):
    out = tiny_llm.generate([[2, 5, 6]], SamplingParams(temperature=0, max_tokens=4, n=2))[0].outputs
    assert out[0].token_ids == out[1].token_ids and out[0].logprobs is None
    assert len(out) == 2
