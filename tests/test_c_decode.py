"""The C decode step (gemmakit/inference/c_decode.py) against the torch model it stands in for."""

import pytest
import torch

from gemmakit.inference import c_decode
from gemmakit.inference.engine import Request, generate_steps
from gemmakit.inference.sampling import SamplingParams
from gemmakit.kernels import cpu as cpu_kernels
from gemmakit.quant import dequantized_state_dict, quantize_model
from tests.test_model import paired

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler here")

CASES = [  # (family, overrides): MQA, GQA and MHA; soft-capping; QK-norm; window of 4
    ("gemma", {}),
    ("gemma", {"num_key_value_heads": 4}),
    ("gemma2", {}),
    ("gemma3", {}),
    ("gemma3", {"num_key_value_heads": 2}),
]


@needs_kernel
@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("family,overrides", CASES)
def test_c_steps_equal_torch_steps(family, overrides, quantize, hf_folder):
    model, _ = paired(hf_folder, family, **overrides)
    reference = model
    if quantize:  # int8 blocks and the tied int8 embedding / lm_head, against the float model
        # holding exactly the int8 weights (torch's int8 kernel rounds activations to bf16)
        reference, _ = paired(hf_folder, family, **overrides)
        quantize_model(model, quantize)
        reference.load_state_dict(dequantized_state_dict(model, torch.float32), strict=False)
    prompt = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(0))  # wraps the window
    tokens = torch.randint(3, 256, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        ours, ref = model.make_cache(1, 24), model.make_cache(1, 24)
        decoder = c_decode.decoder(model, ours, batch=1)
        assert decoder is not None
        reference(prompt, cache=ours), reference(prompt, cache=ref)
        for i, token in enumerate(tokens):
            if i < 8:
                got = decoder.step(token)[0].clone()
            else:  # the torch model continues on the cache the C steps filled
                got = reference(torch.tensor([[token]]), cache=ours)[0, -1]
            want = reference(torch.tensor([[token]]), cache=ref)[0, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert ours.length == ref.length and torch.equal(ours.valid, ref.valid)
    for kind in ref.groups:
        assert torch.equal(ours.groups[kind].slot_cols, ref.groups[kind].slot_cols)


@needs_kernel
@pytest.mark.parametrize("family,overrides", CASES[2:])
def test_bfloat16_c_steps_equal_float_maths_on_bfloat16_weights(family, overrides, hf_folder):
    """A bfloat16 model keeps bfloat16 weights and KV cache in the C step, computing in
    float32: it matches float32 maths on the same (rounded) weights within what the bfloat16
    prefill and cache cost, as the bfloat16 torch step does."""
    model, _ = paired(hf_folder, family, **overrides)
    model.to(torch.bfloat16)
    reference, _ = paired(hf_folder, family, **overrides)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=False)
    prompt = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(3, 256, (8,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        ours, ref, torch_bf16 = model.make_cache(1, 16), reference.make_cache(1, 16), model.make_cache(1, 16)
        errors = []
        decoder = c_decode.decoder(model, ours, batch=1)
        assert decoder is not None
        model(prompt, cache=ours), reference(prompt, cache=ref), model(prompt, cache=torch_bf16)
        for token in tokens:
            got = decoder.step(token)[0].clone()
            want = reference(torch.tensor([[token]]), cache=ref)[0, -1]
            bf16_step = model(torch.tensor([[token]]), cache=torch_bf16)[0, -1].float()
            errors.append(((got - want).abs().max(), (bf16_step - want).abs().max()))
            assert errors[-1][0] <= 0.02 * want.abs().max()
    assert sum(e for e, _ in errors) <= 1.5 * sum(e for _, e in errors)


@needs_kernel
def test_generation_uses_c_steps_and_matches_the_torch_path(hf_folder, monkeypatch):
    model, _ = paired(hf_folder, "gemma3")
    quantize_model(model, "int8")
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    fast = Request([2, 17, 33, 5, 90, 41], params)
    calls = []
    original = c_decode.CDecoder.step
    monkeypatch.setattr(c_decode.CDecoder, "step", lambda self, t: calls.append(t) or original(self, t))
    list(generate_steps(model, [fast]))
    assert len(calls) == 19  # every step after the prefill
    monkeypatch.setattr(c_decode, "decoder", lambda *args: None)
    slow = Request(list(fast.prompt_ids), params)
    list(generate_steps(model, [slow]))
    assert fast.output_ids == slow.output_ids


@needs_kernel
def test_decoder_declines_what_it_cannot_run(hf_folder, monkeypatch):
    from gemmakit.lora import apply_lora

    model, _ = paired(hf_folder, "gemma3")
    with torch.inference_mode():
        assert c_decode.decoder(model, model.make_cache(2, 8), batch=2) is None  # a batch
        assert c_decode.decoder(model, model.make_cache(1, 8), batch=1) is not None
        padded = model.make_cache(1, 8)
        decoder = c_decode.decoder(model, padded, batch=1)
        model(torch.tensor([[0, 5, 6]]), torch.tensor([[False, True, True]]), cache=padded)
        assert decoder.step(7) is None and padded.length == 3  # left padding: the torch step
    assert c_decode.decoder(model, model.make_cache(1, 8), batch=1) is None  # gradients on
    with torch.inference_mode():
        half = model.to(torch.float16)  # a dtype the C step does not read
        assert c_decode.decoder(half, half.make_cache(1, 8), batch=1) is None
        model.float()
        monkeypatch.setenv("GEMMAKIT_NO_C_KERNELS", "1")
        cpu_kernels.library.cache_clear()
        try:
            assert c_decode.decoder(model, model.make_cache(1, 8), batch=1) is None
        finally:
            monkeypatch.delenv("GEMMAKIT_NO_C_KERNELS")
            cpu_kernels.library.cache_clear()
    apply_lora(model, r=4)
    with torch.inference_mode():
        assert c_decode.decoder(model, model.make_cache(1, 8), batch=1) is None  # adapters


def _decode(model, prompt, tokens):
    with torch.inference_mode():
        cache = model.make_cache(1, len(prompt) + len(tokens))
        decoder = c_decode.decoder(model, cache, batch=1)
        model(torch.tensor([prompt]), cache=cache)
        return torch.stack([decoder.step(t)[0].clone() for t in tokens])


def _steps(decoder, tokens):
    return [decoder.step(t) for t in tokens]


# Run in a fresh interpreter (below): a fork copies only the forking thread, so a child forked
# from the test process would inherit whatever the tests before left there (server and
# scheduler threads, other libraries' pools and at-fork handlers) and could hang on a lock one
# of them held at the fork; that depends on the order and timing of the whole run, not on the
# code under test.
_THREADS_AND_FORK = """
import multiprocessing, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from gemmakit.inference import c_decode
from gemmakit.loading import ModelSource, load_model


def _decode(model, prompt, tokens):  # as the test module's (importing it would import transformers)
    with torch.inference_mode():
        cache = model.make_cache(1, len(prompt) + len(tokens))
        decoder = c_decode.decoder(model, cache, batch=1)
        model(torch.tensor([prompt]), cache=cache)
        return torch.stack([decoder.step(t)[0].clone() for t in tokens])


def _steps(decoder, tokens):
    return [decoder.step(t) for t in tokens]


model = load_model(ModelSource("hf", Path(sys.argv[1]), "gemma3"))
jobs = [([2, 9, 14], [5, 6, 7, 8] * 3), ([2, 40], [11, 12] * 6)]
# Steps on one thread first, so that the pool grows (a worker starts) after jobs have run.
torch.set_num_threads(1)
alone = [_decode(model, *job) for job in jobs]
torch.set_num_threads(2)
with ThreadPoolExecutor(2) as pool:
    for _ in range(3):
        together = list(pool.map(lambda job: _decode(model, *job), jobs))
        for a, b in zip(alone, together):
            assert torch.equal(a, b)
with torch.inference_mode():
    cache = model.make_cache(1, 16)
    decoder = c_decode.decoder(model, cache, batch=1)
    model(torch.tensor([[2, 9, 14]]), cache=cache)
    _steps(decoder, [5])
    child = multiprocessing.get_context("fork").Process(target=_steps, args=(decoder, [6, 7, 8]))
    child.start()
    child.join(timeout=60)
if child.is_alive():
    child.kill()
sys.exit(0 if child.exitcode == 0 else 3)
"""


@needs_kernel
def test_c_steps_from_several_threads_and_a_forked_child(hf_folder):
    """The C worker pool is process-wide: concurrent callers take turns, a pool that grows
    after jobs ran gives the same logits, and a child forked after the pool started gets its
    own (it would wait forever on the parent's workers). The child runs C steps only: torch's
    own OpenMP pool does not survive a fork."""
    import subprocess
    import sys

    folder, _ = hf_folder("gemma3")
    done = subprocess.run(
        [sys.executable, "-c", _THREADS_AND_FORK, str(folder)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
