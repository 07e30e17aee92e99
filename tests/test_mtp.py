"""Speculative decoding with Gemma 4's MTP drafter (`--speculative mtp`): a tiny random
Gemma 4 target (tests/test_gemma4.py's E2B-like variant: KV sharing, K = V, own global head
dims) and a tiny random assistant whose layers fit it (tests/test_gemma4_assistant.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from gemmakit.errors import GemmakitError
from gemmakit.inference import speculative
from gemmakit.inference.engine import Request, generate_steps
from gemmakit.inference.proposers import MtpProposer, kv_cache_reader
from gemmakit.inference.sampling import SamplingParams
from gemmakit.loading import ModelSource, load_assistant, load_model
from gemmakit.model.cache import RING_SLACK
from tests.test_gemma4 import VOCAB, random_gemma4
from tests.test_gemma4_assistant import random_assistant

TARGET = "ple_shared_k_eq_v"


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: every test of this module on one thread (conftest's `one_thread`)."""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(target folder, assistant folder, gemmakit target, gemmakit assistant, HF target, HF assistant)."""
    from tests.test_training import write_tiny_tokenizer

    ref_target, ref_assistant = random_gemma4(TARGET, seed=1), random_assistant(False, seed=2)
    target_dir, assistant_dir = tmp_path_factory.mktemp("target"), tmp_path_factory.mktemp("assistant")
    ref_target.save_pretrained(target_dir)
    write_tiny_tokenizer(target_dir)
    ref_assistant.save_pretrained(assistant_dir)
    target = load_model(ModelSource("hf", target_dir, TARGET))
    return target_dir, assistant_dir, target, load_assistant(assistant_dir), ref_target, ref_assistant


def _prompts() -> list[list[int]]:
    """Prompts that repeat themselves and random ones, some past window + ring slack."""
    g = torch.Generator().manual_seed(0)
    prompts = []
    for n in (3, 5, 9):
        block = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        prompts.append(block * 4)
    return prompts + [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (2, 7, 30)]


def _requests(prompts, **params):
    return [
        Request(p, SamplingParams(**params), stop_ids=(1,), generator=random.Random(i))
        for i, p in enumerate(prompts)
    ]


@pytest.mark.parametrize("k", [1, 4, RING_SLACK])
def test_greedy_output_is_plain_greedy(pair, k):
    _, _, target, assistant, _, _ = pair
    prompts = _prompts()
    plain = _requests(prompts, temperature=0, max_tokens=24, ignore_eos=True)
    for request in plain:
        list(generate_steps(target, [request]))
    spec = _requests(
        prompts, temperature=0, max_tokens=24, ignore_eos=True, speculative="mtp", num_speculative_tokens=k
    )
    list(speculative.generate_steps(target, spec, assistant))
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    stats = [r.speculation for r in spec]
    assert all(s.generated == 23 and s.accepted <= s.proposed for s in stats)
    assert sum(s.proposed for s in stats) > 0


def test_first_round_drafts_what_transformers_drafts(pair):
    """After the prompt, the proposer's k greedy tokens are those transformers'
    Gemma4AssistantCandidateGenerator loop gives from the HF target's hidden state and KV."""
    _, _, target, assistant, ref_target, ref_assistant = pair
    for prompt in _prompts():
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = ref_target(ids, output_hidden_states=True, return_shared_kv_states=True)
            token = out.logits[0, -1].argmax().view(1, 1)
            hidden, kv, want = out.hidden_states[-1][:, -1:], dict(out.shared_kv_states), []
            for _ in range(5):
                embedding = ref_target.get_input_embeddings()(token)
                step = ref_assistant(
                    inputs_embeds=torch.cat([embedding, hidden], -1),
                    position_ids=torch.tensor([[len(prompt)]]),
                    shared_kv_states=kv,
                )
                token, hidden = step.logits.argmax(-1), step.last_hidden_state
                want.append(int(token))
        request = Request(prompt, SamplingParams(temperature=0), stop_ids=(1,))
        with torch.inference_mode():
            cache = target.make_cache(1, len(prompt) + 8, ring_slack=RING_SLACK + 1)
            proposer = MtpProposer(target, assistant, kv_cache_reader(cache))
            h = target.hidden_states(ids, cache=cache)
            proposer.observe(h[0, -1:])
            request.output_ids.append(int(target.logits(h[0, -1]).argmax()))
            assert proposer.propose(request, 5)[0] == want


def test_seeded_sampling_is_reproducible_and_counts_add_up(pair):
    _, _, target, assistant, _, _ = pair
    params = dict(temperature=0.8, top_p=0.9, max_tokens=16, ignore_eos=True, speculative="mtp")
    runs = []
    for _ in range(2):
        requests = _requests(_prompts()[:3], **params)
        list(speculative.generate_steps(target, requests, assistant))
        runs.append([r.output_ids for r in requests])
        assert all(
            r.speculation.generated == 15 == r.speculation.steps + r.speculation.accepted for r in requests
        )
    assert runs[0] == runs[1] and all(len(ids) == 16 for ids in runs[0])


def test_mistakes_are_clear_errors(pair, tiny_target_gemma3):
    _, _, target, assistant, _, _ = pair
    with pytest.raises(GemmakitError, match="needs a Gemma 4 assistant"):
        list(speculative.generate_steps(target, _requests([[5, 6]], max_tokens=3, speculative="mtp")))
    with pytest.raises(GemmakitError, match="speculative='mtp', not 'draft'"):
        list(
            speculative.generate_steps(
                target, _requests([[5, 6]], max_tokens=3, speculative="draft"), assistant
            )
        )
    with pytest.raises(GemmakitError, match="made for a target of width"):
        list(
            speculative.generate_steps(
                tiny_target_gemma3, _requests([[5, 6]], max_tokens=3, speculative="mtp"), assistant
            )
        )


@pytest.fixture(scope="module")
def tiny_target_gemma3(tmp_path_factory):
    from tests.conftest import random_hf_model

    folder = tmp_path_factory.mktemp("gemma3")
    random_hf_model("gemma3").save_pretrained(folder)
    return load_model(ModelSource("hf", folder, "gemma3"))


def test_generate_mtp_json_gives_plain_greedy_tokens_and_statistics(pair, capsys):
    from gemmakit.cli import main

    target_dir, assistant_dir, *_ = pair
    argv = [
        "generate",
        "a b c a b c a b",
        "--model",
        str(target_dir),
        "--greedy",
        "--max-new-tokens",
        "10",
        "--json",
    ]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert (
        main(argv + ["--speculative", "mtp", "--draft-model", str(assistant_dir), "--num-speculative", "3"])
        == 0
    )
    spec = json.loads(capsys.readouterr().out)
    assert spec["outputs"][0]["token_ids"] == plain["outputs"][0]["token_ids"]
    total = spec["speculation"]
    assert (
        total["generated"] == len(plain["outputs"][0]["token_ids"]) - 1
        and total["proposed"] > 0
        and 0 <= total["acceptance_rate"] <= 1
    )
    assert main(["generate", "x", "--model", str(target_dir), "--speculative", "mtp"]) == 2
    assert "--speculative mtp needs --draft-model" in capsys.readouterr().err


@pytest.mark.parametrize("k", [3, RING_SLACK])
def test_mtp_rows_in_the_batched_engine_give_plain_greedy_beside_plain_rows(pair, k):
    """MTP rows verify in the engine's batched torch step beside plain and n-gram rows, rows
    joining mid-run, prompts past window + ring slack: every row's tokens are plain greedy's."""
    from gemmakit.inference.batching import Engine
    from tests.test_batching import run

    _, _, target, assistant, _, _ = pair
    prompts = _prompts()
    plain = _requests(prompts, temperature=0, max_tokens=24, ignore_eos=True)
    for request in plain:
        list(generate_steps(target, [request]))
    modes = ["mtp", None, "mtp", "ngram", "mtp", None]
    requests = [
        Request(p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, speculative=m,
                                  num_speculative_tokens=k))
        for p, m in zip(prompts, modes)
    ]  # fmt: skip
    engine = Engine(target, slots=4, capacity=128, prefill_chunk=8, draft=assistant)
    run(engine, requests, join_at={1: 1, 2: 2, 4: 5, 5: 6})
    assert [r.output_ids for r in requests] == [r.output_ids for r in plain]
    mtp = [r.speculation for r, m in zip(requests, modes) if m == "mtp"]
    assert all(s.generated == 23 and s.proposed > 0 for s in mtp)


def test_llm_generate_runs_an_mtp_batch_in_the_engine(pair):
    from gemmakit.inference.api import LLM

    target_dir, assistant_dir, *_ = pair
    llm = LLM(str(target_dir), dtype="float32", device="cpu", draft_model=str(assistant_dir))
    prompts = [p[:12] for p in _prompts()[:3]]
    want = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    got = llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, speculative="mtp")
    )
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert all(o.metrics["speculation"]["generated"] == 9 for o in got)
    assert llm._engine.speculation.totals.steps > 0  # the batch ran in the engine
