"""Speculative decoding (gemmakit/inference/speculative.py) and the KV-cache rollback under it."""

import pytest
import torch

from gemmakit.inference import c_decode
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
def test_c_step_on_a_rolled_back_cache_with_slack_equals_torch(hf_folder):
    """The C step runs a cache with slack while its rings hold no more than a window, and
    declines once they do (it attends every visible slot): the torch step takes over."""
    model, _ = paired(hf_folder, "gemma3")
    prompt, tokens = torch.tensor([_tokens(2, 0)]), _tokens(12, 1)
    with torch.inference_mode():
        spec, plain = model.make_cache(1, 40, ring_slack=RING_SLACK), model.make_cache(1, 40)
        model(prompt, cache=spec), model(prompt, cache=plain)
        fast = c_decode.decoder(model, spec, 1)
        ran_in_c = []
        for step, token in enumerate(tokens):
            model(torch.tensor([_tokens(3, 50 + step)]), cache=spec)
            spec.rollback(3)
            got = fast.step(token)
            ran_in_c.append(got is not None)
            if got is None:
                got = model(torch.tensor([[token]]), cache=spec)[:, -1]
            want = model(torch.tensor([[token]]), cache=plain)[:, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert ran_in_c[:2] == [True, True] and not ran_in_c[-1]  # window 4: C for columns 2 and 3
