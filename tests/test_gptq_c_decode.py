"""GPTQ / AWQ 4-bit weights in the C kernels (csrc/packed4.c) and the C decode steps."""

from __future__ import annotations

import pytest
import torch

from gemmakit.inference import c_decode
from gemmakit.kernels import build as kernel_build
from gemmakit.kernels import cpu as cpu_kernels
from gemmakit.quant import dequantized_state_dict
from gemmakit.quant.gptq import GPTQSettings, gptq_quantize, gptq_quantize_model
from gemmakit.quant.gptq_linear import GPTQLinear
from gemmakit.quant.packed4 import c_layout, c_unlayout
from tests.test_c_batch import decode_together, sequences, slot_cache
from tests.test_model import paired

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler here")


def _module(desc_act: bool, N=48, K=256, group_size=64, seed=0) -> GPTQLinear:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    X = torch.randn(512, K, generator=g) * torch.linspace(0.1, 3, K)  # act-order has an order to find
    settings = GPTQSettings(group_size, desc_act=desc_act)
    return GPTQLinear.from_quantized(gptq_quantize(W, X.t() @ X, settings=settings), group_size)


def test_c_layout_round_trips_and_puts_column_j_plus_16_in_the_high_nibble():
    levels = torch.randint(0, 16, (3, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = c_layout(levels)
    assert packed.shape == (3, 32) and torch.equal(c_unlayout(packed), levels)
    assert int(packed[1, 16 + 5]) == int(levels[1, 32 + 5]) | int(levels[1, 48 + 5]) << 4


@needs_kernel
@pytest.mark.parametrize("desc_act", [False, True])
def test_packed4_dequantizes_exactly_and_rows_do_not_depend_on_the_batch(desc_act):
    m = _module(desc_act)
    tensors = m.c_tensors()
    assert (tensors["perm"] is not None) == desc_act  # act-order groups are not in column order
    weight = m.dequantize(torch.float32)
    assert torch.equal(cpu_kernels.packed4_dequantize(tensors, 48, 64), weight)  # (q - z) * s is exact
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(1))
    y = cpu_kernels.packed4_matmul(x, tensors, 48, 64)
    torch.testing.assert_close(y, x @ weight.t(), rtol=1e-5, atol=1e-4)
    for r in range(7):  # bit for bit the same alone as in a batch of 7
        assert torch.equal(cpu_kernels.packed4_matmul(x[r : r + 1], tensors, 48, 64)[0], y[r])


def test_c_tensors_decline_what_packed4_cannot_take():
    m = _module(False)
    m.g_idx.copy_(torch.arange(256) % 4)  # groups of columns 0, 4, 8, ...: still equal sizes
    assert m.c_tensors() is not None
    m._c = None
    m.g_idx[0] = 1  # a group of 65 columns and one of 63
    assert m.c_tensors() is None
    assert GPTQLinear(256, 48, 16).c_tensors() is None  # groups narrower than packed4's 32-column chunks


@needs_kernel
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-f16c")])
def test_packed4_avx2_and_scalar_paths_give_the_same_numbers(flags):
    other = kernel_build.compile_library(kernel_build.FLAGS + flags)
    if other is None:
        pytest.skip("the compiler rejects " + " ".join(flags))
    import ctypes

    m = _module(True)
    tensors = m.c_tensors()
    packed = cpu_kernels.packed4_struct(tensors, 64)
    out = torch.empty(48, 256)
    other.packed4_dequantize_rows(ctypes.byref(packed), 256, out.data_ptr(), 0, 48)
    assert torch.equal(out, m.dequantize(torch.float32))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    y = torch.empty(3, 48)
    other.packed4_matmul_rows(ctypes.byref(packed), 48, 256, x.data_ptr(), 3, y.data_ptr(), 0, 48)
    torch.testing.assert_close(y, cpu_kernels.packed4_matmul(x, tensors, 48, 64), rtol=1e-5, atol=1e-5)


def _gptq_pair(hf_folder, desc_act: bool):
    """A GPTQ-quantized tiny Gemma 3 and the float model holding exactly its weights."""
    model, _ = paired(hf_folder, "gemma3")
    windows = [torch.randint(3, 256, (1, 48), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    gptq_quantize_model(model, windows, settings=GPTQSettings(32, desc_act=desc_act))
    assert sum(isinstance(m, GPTQLinear) for m in model.modules()) == 14
    reference, _ = paired(hf_folder, "gemma3")
    weights = {f"{name}.weight": m.dequantize(torch.float32) for name, m in model.named_modules()
               if isinstance(m, GPTQLinear)}  # fmt: skip
    assert not reference.load_state_dict(dequantized_state_dict(model) | weights, strict=False).missing_keys
    return model, reference


@needs_kernel
@pytest.mark.parametrize("desc_act", [False, True])
def test_c_step_of_a_gptq_model_equals_the_torch_model_on_its_weights(desc_act, hf_folder):
    model, reference = _gptq_pair(hf_folder, desc_act)
    assert_c_steps_match(model, reference, steps=10)


def assert_c_steps_match(model, reference, steps: int):
    """After a 7-token prompt (the reference's keys and values in both caches), each of
    `steps` C decode steps of `model` gives the reference's logits within 1e-4; the C step
    must take the model (not decline it to the torch fallback)."""
    prompt = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(3, 256, (steps,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.inference_mode():
        ours, ref = model.make_cache(1, 24), model.make_cache(1, 24)
        decoder = c_decode.decoder(model, ours, batch=1)
        assert decoder is not None
        reference(prompt, cache=ours), reference(prompt, cache=ref)
        for token in tokens:
            got = decoder.step(token)[0].clone()
            want = reference(torch.tensor([[token]]), cache=ref)[0, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_batched_gptq_steps_give_each_row_its_logits_alone(hf_folder):
    model, _ = _gptq_pair(hf_folder, True)
    seqs = sequences([9, 4, 6, 6, 5, 7, 3, 8, 9], seed=4)  # 9 rows down to 2
    with torch.inference_mode():
        together = decode_together(c_decode.batch_decoder(model, slot_cache(model, 9, 10)), seqs)
        for i, seq in enumerate(seqs):
            alone = decode_together(c_decode.batch_decoder(model, slot_cache(model, 1, 10)), [seq])[0]
            assert torch.equal(alone, together[i])  # bit for bit: greedy tokens cannot differ
