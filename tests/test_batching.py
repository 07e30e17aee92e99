"""The continuous-batching engine and its slot cache, on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch

from gemmakit.config import SLIDING
from gemmakit.hf_config import from_hf_config
from gemmakit.inference.batching import ERROR, Engine
from gemmakit.inference.engine import Request, generate_steps
from gemmakit.inference.sampling import SamplingParams
from gemmakit.model.families import model_class
from gemmakit.model.slot_cache import RING_SLACK, SlotCache
from tests.conftest import FAMILIES, tiny_hf_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: every test of this module on one thread (conftest's `one_thread`)."""


def tiny_model(hf_config, seed: int = 0):
    """A gemmakit model of a transformers config with every parameter random."""
    config = from_hf_config(hf_config.to_dict())
    torch.manual_seed(seed)
    model = model_class(config)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def gemma3n_config():
    from tests.test_gemma3n import tiny_config

    return tiny_config("shared_kv_altup3_active1")


def gemma4_config(variant: str):
    import transformers

    from tests.test_gemma4 import VARIANTS

    cfg = transformers.Gemma4TextConfig(**VARIANTS[variant])
    cfg._attn_implementation = "eager"
    return cfg


CONFIGS = {
    **{f: (lambda f=f: tiny_hf_config(f)) for f in FAMILIES},
    "gemma3n": gemma3n_config,
    "gemma4_shared": lambda: gemma4_config("ple_shared_k_eq_v"),
    "gemma4_moe": lambda: gemma4_config("moe"),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return tiny_model(CONFIGS[request.param]())


def prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 150, (length,), generator=gen).tolist()


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def alone(model, ids: list[int], params=GREEDY) -> list[int]:
    """Today's generation of one row (`generate_steps`): the reference."""
    req = Request(list(ids), params)
    for _ in generate_steps(model, [req]):
        pass
    return req.output_ids


def run(engine: Engine, requests: list[Request], join_at: dict[int, int] | None = None) -> int:
    """Steps the engine until every request ends; request i joins at step join_at[i] (0)."""
    join_at = join_at or {}
    steps = 0
    pending = dict(enumerate(requests))
    while pending or engine.has_work():
        for i in [i for i in pending if join_at.get(i, 0) <= steps]:
            engine.add(pending.pop(i))
        engine.step()
        steps += 1
    return steps


# --- the slot cache -----------------------------------------------------------------------


def test_chunked_prefill_through_the_slot_cache_equals_a_full_forward(model):
    """Logits of a prompt prefilled in chunks of 1, 5 and 23 tokens into slot 2 of a slot cache
    equal one cache-free forward; the sliding window (4) is far shorter than the prompt."""
    ids = torch.tensor([prompt(40, 1)])
    with torch.no_grad():
        want = model(ids)[0]
        for chunk in (1, 5, 23):
            cache = SlotCache(model.config, 3, 64, model.dtype, model.device)
            cache.row_slots = torch.tensor([2])
            got = []
            for start in range(0, 40, chunk):
                part = ids[:, start : start + chunk]
                positions = torch.arange(start, start + part.shape[1])[None]
                got.append(model(part, positions=positions, cache=cache)[0])
            torch.testing.assert_close(torch.cat(got), want, atol=1e-4, rtol=1e-4)


def test_ring_layout_is_the_contract(model):
    c = model.config
    cache = SlotCache(c, 3, 64, model.dtype, model.device)
    kv = cache.layer_kv()
    assert len(kv) == c.num_hidden_layers
    for i, entry in enumerate(kv):
        if not c.layer_owns_kv(i):
            assert entry is None
            continue
        k, v = entry
        cap = min(64, c.sliding_window + RING_SLACK) if c.layer_types[i] == SLIDING else 64
        assert k.shape == v.shape == (3, c.layer_kv_heads(i), cap, c.layer_head_dim(i))
        assert k.is_contiguous() and k.dtype == model.dtype


def test_a_slot_cache_commits_only_the_pages_its_keys_are_written_to():
    """lazy_zeros: zeros, committed 4 KiB at a time as written (a first key in a fresh slot
    must not zero a huge page of each layer, as numpy's calloc-backed zeros did)."""
    import resource

    from gemmakit.model.slot_cache import lazy_zeros

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    before = rss()
    big = lazy_zeros((64, 1024, 256), torch.float32, "cpu")  # 64 MiB
    assert big.is_contiguous() and big.data_ptr() % 64 == 0
    assert rss() - before < 4 << 20 and not big[::7, ::100].any()
    big[:, 0, :4] = 1.0  # a few bytes in 64 places 1 MiB apart
    assert rss() - before < 8 << 20  # 64 small pages, not 64 huge ones
    assert float(big.sum()) == 64 * 4


# --- the engine ---------------------------------------------------------------------------


@pytest.mark.parametrize("c_step", [True, False], ids=["c-step-if-any", "torch-step"])
def test_greedy_tokens_alone_equal_batched_with_rows_joining_mid_run(model, c_step):
    """Several prompt lengths (longer than the window), rows joining while others decode,
    prefill chunks shorter than the prompts: every row's tokens equal its own generation,
    with the batched C step (Gemma 1-3) and with the torch step over the slot cache."""
    lengths = [3, 17, 40, 9, 26]
    prompts = [prompt(n, seed) for seed, n in enumerate(lengths)]
    want = [alone(model, p) for p in prompts]
    engine = Engine(model, slots=3, capacity=64, prefill_chunk=8)
    if not c_step:
        engine.fast = None
    requests = [Request(p, GREEDY) for p in prompts]
    run(engine, requests, join_at={1: 2, 2: 3, 3: 9, 4: 10})
    assert [r.output_ids for r in requests] == want
    assert all(r.finish_reason == "length" for r in requests)
    assert engine.counters.max_rows == 3  # three slots, all busy at some step


def test_a_short_request_finishes_long_before_a_long_one(model):
    engine = Engine(model, slots=4, capacity=256)
    long = Request(prompt(10, 1), SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    short = Request(prompt(6, 2), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.add(long)
    for _ in range(20):
        engine.step()
    engine.add(short)
    steps_short = 0
    while short.finish_reason is None:
        engine.step()
        steps_short += 1
    assert steps_short <= 4 and len(long.output_ids) < 30  # joined at once, did not wait
    while engine.has_work():
        engine.step()
    assert len(long.output_ids) == 200 and short.output_ids == alone(model, short.prompt_ids, short.params)


def test_a_failing_row_ends_alone_and_its_slot_is_freed(model):
    def broken(output_ids, logits):
        raise RuntimeError("processor broke")

    engine = Engine(model, slots=2, capacity=64)
    good = Request(prompt(7, 3), GREEDY)
    bad = Request(prompt(5, 4), GREEDY, logits_processor=broken)
    nan_logits = lambda output_ids, logits: logits * float("nan")  # noqa: E731
    nan = Request(prompt(5, 5), SamplingParams(temperature=1.0, max_tokens=4), logits_processor=nan_logits)
    handles = [engine.add(r) for r in (good, bad, nan)]
    run(engine, [])
    assert good.output_ids == alone(model, good.prompt_ids) and good.finish_reason == "length"
    assert bad.finish_reason == ERROR and "processor broke" in str(handles[1].error)
    assert nan.finish_reason == ERROR and handles[2].error is not None
    assert engine.free_slots == 2 and not engine.running


def test_cancel_between_prefill_chunks_frees_the_slot(model):
    engine = Engine(model, slots=1, capacity=256, prefill_chunk=16)
    req = Request(prompt(200, 6), GREEDY)
    seq = engine.add(req)
    engine.step()
    assert seq.held == 16 and seq.prefilling
    req.finish_reason = "abort"
    engine.step()
    assert seq.held == 16 and not req.output_ids and engine.free_slots == 1 and not engine.has_work()


def test_prefix_reuse_prefills_only_the_new_tokens_with_the_same_tokens(model):
    """A second chat turn that re-sends the first turn's prompt and reply reuses that slot's
    keys and values; its tokens equal a cold run's."""
    engine = Engine(model, slots=2, capacity=128, prefill_chunk=32)
    first = Request(prompt(30, 7), GREEDY)
    run(engine, [first])
    history = first.prompt_ids + first.output_ids
    second = Request(history + prompt(5, 8), GREEDY)
    seq = engine.add(second)
    run(engine, [])
    held_after_first = len(first.prompt_ids) + len(first.output_ids) - 1  # the last was never fed
    assert seq.reused == held_after_first
    assert engine.counters.prefix_hit_tokens == held_after_first
    assert second.output_ids == alone(model, second.prompt_ids)


def test_prefix_reuse_refuses_what_a_sliding_ring_no_longer_holds(model):
    """A prompt that shares only an early part of a long cached sequence: a sliding layer's
    ring has overwritten the window before the split, so the engine prefills it all."""
    engine = Engine(model, slots=1, capacity=128)
    first = Request(prompt(60, 9), GREEDY)
    run(engine, [first])
    second = Request(first.prompt_ids[:20] + prompt(6, 10), GREEDY)
    seq = engine.add(second)
    run(engine, [])
    has_sliding = SLIDING in model.config.layer_types
    assert seq.reused == (0 if has_sliding else 20)
    assert second.output_ids == alone(model, second.prompt_ids)


def test_prompt_over_capacity_is_a_context_length_error(model):
    from gemmakit.errors import ContextLengthError

    engine = Engine(model, slots=1, capacity=16)
    with pytest.raises(ContextLengthError):
        engine.add(Request(prompt(16, 1), GREEDY))


def test_a_prompt_sharing_a_running_rows_prefix_copies_its_keys_and_values(model):
    """Two requests with one system prompt: the second, admitted while the first runs, copies
    the first's keys and values for the shared part; both give their cold tokens."""
    system = prompt(12, 11)
    first = Request(system + prompt(4, 12), GREEDY)
    second = Request(system + prompt(5, 13), GREEDY)
    engine = Engine(model, slots=2, capacity=64)
    engine.add(first)
    engine.step()
    seq = engine.add(second)
    run(engine, [])
    # The first row held 17 positions when the second came: a sliding ring of window 4 +
    # RING_SLACK still holds the window before position 12.
    assert seq.reused == 12 and engine.counters.prefix_hit_tokens == 12
    assert first.output_ids == alone(model, first.prompt_ids)
    assert second.output_ids == alone(model, second.prompt_ids)


# --- prefill chunks of several rows in one forward pass -----------------------------------------


def count_passes(engine: Engine) -> list[tuple[int, int]]:
    """Records the (rows, width) of every forward pass the engine's torch model runs."""
    passes, forward = [], engine._forward_rows

    def counted(ids, *args):
        passes.append(tuple(ids.shape))
        return forward(ids, *args)

    engine._forward_rows = counted
    return passes


def count_c_steps(engine: Engine) -> list[tuple[list[int], list[int], list[int] | None]]:
    """Records the (slots, positions, logit rows) of every batched C step the engine runs."""
    steps, step = [], engine.fast.step

    def counted(tokens, slots, positions, logit_rows=None):
        steps.append((list(slots), list(positions), logit_rows))
        return step(tokens, slots, positions, logit_rows)

    engine.fast.step = counted
    return steps


def c_step_or_skip(engine: Engine, c_step: bool) -> None:
    """The engine on the C step (skipping families it does not run) or on the torch step."""
    if not c_step:
        engine.fast = None
    elif engine.fast is None:
        pytest.skip("the C step does not run this family")
    else:  # prompt chunks as rows of the C step, which the engine picks over GGUF blocks only
        engine.prompts_in_c = True


@pytest.mark.parametrize("c_step", [True, False], ids=["c-step", "torch-step"])
def test_prompts_arriving_together_prefill_in_shared_passes_with_their_own_tokens(model, c_step):
    """Six prompts at once, every row's tokens equal its own generation (prompts longer than
    the window and its ring: sliding layers included). The C step runs all six prompts as
    the rows of one call, only their last rows through the head; the torch step shares a
    forward pass between the chunks of one length."""
    lengths = [3, 17, 40, 9, 17, 40]
    prompts = [prompt(n, 20 + seed) for seed, n in enumerate(lengths)]
    engine = Engine(model, slots=6, capacity=64)
    c_step_or_skip(engine, c_step)
    passes = count_passes(engine)
    c_steps = count_c_steps(engine) if c_step else []
    requests = [Request(p, GREEDY) for p in prompts]
    run(engine, requests)
    assert [r.output_ids for r in requests] == [alone(model, p) for p in prompts]
    prefill = [p for p in passes if p[1] > 1]
    if not c_step:
        assert sorted(prefill) == [(1, 3), (1, 9), (2, 17), (2, 40)]
        return
    slots, positions, logit_rows = c_steps[0]
    assert not passes and len(slots) == sum(lengths) and len(set(slots)) == 6
    assert logit_rows == [end - 1 for end in torch.tensor(lengths).cumsum(0).tolist()]
    assert all(len(s) == 6 and r is not None and len(r) == 6 for s, _, r in c_steps[1:])  # decode


@pytest.mark.parametrize("c_step", [True, False], ids=["c-step", "torch-step"])
def test_a_row_failing_in_a_shared_prefill_pass_ends_alone(model, c_step):
    engine = Engine(model, slots=3, capacity=64)
    c_step_or_skip(engine, c_step)
    forward = engine._forward_rows

    def failing(ids, slots, starts, adapters):
        if 1 in slots:
            raise RuntimeError("slot 1 broke")
        return forward(ids, slots, starts, adapters)

    engine._forward_rows = failing
    if c_step:
        step = engine.fast.step

        def failing_c(tokens, slots, positions, logit_rows=None):
            if 1 in slots:
                raise RuntimeError("slot 1 broke")
            return step(tokens, slots, positions, logit_rows)

        engine.fast.step = failing_c
    requests = [Request(prompt(n, 30 + n), GREEDY) for n in (8, 9, 10)]
    handles = [engine.add(r) for r in requests]
    run(engine, [])
    failed = [h for h in handles if h.request.finish_reason == ERROR]
    assert len(failed) == 1 and "slot 1 broke" in str(failed[0].error)
    for h in handles:
        if h not in failed:
            assert h.request.output_ids == alone(model, h.request.prompt_ids)
    assert engine.free_slots == 3


@pytest.mark.parametrize("c_step", [True, False], ids=["c-step", "torch-step"])
def test_later_rows_join_a_prefill_step_as_the_budget_allows(model, c_step):
    """Budget 50, prompts of 35, 20 and 9 tokens. The torch step: the oldest row takes its 35
    tokens, the 20-token prompt waits (15 left) rather than prefill a stub of it in a pass of
    its own, the 9-token one behind it fits whole. The C step has no passes to share: it
    fills the budget in admission order (35, then 15 of the 20)."""
    engine = Engine(model, slots=3, capacity=64, prefill_chunk=50)
    c_step_or_skip(engine, c_step)
    passes = count_passes(engine)
    handles = [engine.add(Request(prompt(n, 50 + n), GREEDY)) for n in (35, 20, 9)]
    engine.step()
    if c_step:
        assert [h.held for h in handles] == [35, 15, 0] and not passes
    else:
        assert [h.held for h in handles] == [35, 0, 9] and passes == [(1, 35), (1, 9)]
    run(engine, [])
    for h in handles:
        assert h.request.output_ids == alone(model, h.request.prompt_ids)


def test_the_bundled_gguf_gives_each_prompt_of_a_burst_its_own_tokens():
    """On the GGUF's own block types (8-bit activation products, where a last-bit difference
    grows into other logits): prompts prefilled together, two of one length in one pass, get
    the logits and greedy tokens each gets alone."""
    from gemmakit.loading import load

    loaded = load()
    texts = ["What is the capital of France?", "Name a prime number.", "Name an even number.", "Hi"]
    prompts = [loaded.tokenizer.encode(t) for t in texts]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def generate(batch):
        engine = Engine(loaded.model, slots=4, capacity=128)
        firsts, sample = {}, engine._sample
        engine._sample = lambda seqs, logits: (
            firsts.setdefault("logits", {id(s.request): logits[i].clone() for i, s in enumerate(seqs)}),
            sample(seqs, logits),
        )[1]
        requests = [Request(p, params, loaded.stop_ids) for p in batch]
        run(engine, requests)
        return [r.output_ids for r in requests], [firsts["logits"][id(r)] for r in requests]

    together, logits = generate(prompts)
    assert len({len(p) for p in prompts}) < len(prompts)  # a pass of two rows
    for i, p in enumerate(prompts):
        tokens, (alone_logits,) = generate([p])
        assert together[i] == tokens[0] and torch.equal(logits[i], alone_logits)


def test_a_prompt_longer_than_the_sliding_ring_in_one_c_step_gives_the_torch_logits(model):
    """Chunks of 30 prompt tokens (the sliding rings hold window 4 + RING_SLACK = 20) beside
    a decoding row: the first token's logits equal the torch model's over the whole prompt,
    within float32 summation order, and the tokens equal the prompt's own generation."""
    engine = Engine(model, slots=2, capacity=128, prefill_chunk=30)
    c_step_or_skip(engine, True)
    ids = prompt(75, 60)
    firsts, sample = {}, engine._sample
    engine._sample = lambda seqs, logits: (
        firsts.update(
            {id(s.request): logits[i].clone() for i, s in enumerate(seqs) if not s.request.output_ids}
        ),
        sample(seqs, logits),
    )[1]
    other, long = Request(prompt(6, 61), GREEDY), Request(ids, GREEDY)
    run(engine, [other, long], join_at={1: 1})
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0, -1]
    torch.testing.assert_close(firsts[id(long)], want, rtol=1e-4, atol=1e-4)
    assert long.output_ids == alone(model, ids) and other.output_ids == alone(model, other.prompt_ids)


def test_the_bundled_gguf_generates_alone_what_the_engine_generates():
    """generate's own loop (`generate_steps`: the C step prefills and decodes one sequence)
    and the engine beside other rows give the same tokens on the GGUF's block types, where a
    prefill on another path (torch's) would differ in the last bits and may flip a token."""
    from gemmakit.loading import load

    loaded = load()
    ids = loaded.tokenizer.encode("Write a haiku about the sea, then explain it.")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine = Engine(loaded.model, slots=2, capacity=128)
    together = [Request(ids, params), Request(prompt(30, 70), params)]
    run(engine, together, join_at={1: 1})
    assert together[0].output_ids == alone(loaded.model, ids, params)


def test_a_prompt_arriving_while_rows_decode_shares_their_c_step(model):
    """One C call a step: a prompt admitted while two rows decode runs its chunk in the same
    call as their decode rows (only the decode rows and, when it ends, the prompt's last row
    through the head), and every row keeps its own tokens."""
    engine = Engine(model, slots=3, capacity=64, prefill_chunk=16)
    c_step_or_skip(engine, True)
    steps = count_c_steps(engine)
    first, second, late = (Request(prompt(n, 80 + n), GREEDY) for n in (5, 7, 20))
    run(engine, [first, second, late], join_at={2: 3})
    slots, positions, logit_rows = steps[3]  # the late prompt's first chunk (16 of its 20 tokens)
    assert len(slots) == 2 + 16 and logit_rows == [0, 1]
    slots, positions, logit_rows = steps[4]  # its last 4 tokens: the last one through the head
    assert len(slots) == 2 + 4 and logit_rows == [0, 1, 5] and positions[2:] == [16, 17, 18, 19]
    for r in (first, second, late):
        assert r.output_ids == alone(model, r.prompt_ids)
