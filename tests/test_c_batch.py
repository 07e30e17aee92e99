"""The batched C decode step (c_decode.batch_decoder, csrc/decode_batch.c) against the torch
model run per sequence, against itself one row at a time, and across its vector paths."""

import pytest
import torch

from gemmakit.config import FULL
from gemmakit.inference import c_decode
from gemmakit.kernels import build as kernel_build
from gemmakit.kernels import cpu as cpu_kernels
from gemmakit.quant import dequantized_state_dict, quantize_model
from tests.test_model import paired

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler here")

# The slack a slot cache's sliding rings keep beyond the window (gemmakit/model/slot_cache.py's
# RING_SLACK): up to this many rows of one slot at consecutive positions in one step.
RING_SLACK = 16

CASES = [  # (family, overrides): MQA, GQA and MHA; soft-capping; QK-norm; windows of 4
    ("gemma", {}),
    ("gemma", {"num_key_value_heads": 4}),
    ("gemma2", {}),
    ("gemma3", {}),
    ("gemma3", {"num_key_value_heads": 2}),
    # widths that leave a tail past the last full vector of every product (K = 72, 136)
    ("gemma3", {"hidden_size": 72, "intermediate_size": 136, "head_dim": 18}),
]


def slot_cache(model, slots: int, capacity: int):
    """Per layer (keys, values), (slots, kv_heads, capacity of the layer, head_dim) zeros: the
    contract's slot cache (a sliding ring holds min(capacity, window + RING_SLACK) positions)."""
    c = model.config
    layer_kv = []
    for kind in c.layer_types:
        cap = capacity if kind == FULL else min(capacity, c.sliding_window + RING_SLACK)
        shape = (slots, c.num_key_value_heads, cap, c.head_dim)
        layer_kv.append((torch.zeros(shape, dtype=model.dtype), torch.zeros(shape, dtype=model.dtype)))
    return layer_kv


def sequences(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]


def decode_together(decoder, seqs):
    """Feeds every sequence (slot i) one token per step, all slots that still have tokens in
    the same step; per sequence the logits (len, V) after each of its tokens."""
    out = [[] for _ in seqs]
    for t in range(max(map(len, seqs))):
        live = [i for i, s in enumerate(seqs) if t < len(s)]
        logits = decoder.step([seqs[i][t] for i in live], live, [t] * len(live))
        for row, i in enumerate(live):
            out[i].append(logits[row].clone())
    return [torch.stack(rows) if rows else None for rows in out]


def decode_in_chunks(decoder, seq, chunks, slot=0):
    """Feeds one sequence into one slot as steps of `chunks` consecutive rows each."""
    out, start = [], 0
    for size in chunks:
        logits = decoder.step(seq[start : start + size], [slot] * size, list(range(start, start + size)))
        out.append(logits.clone())
        start += size
    return torch.cat(out)


def torch_logits(model, seqs):
    """The torch model's logits after every token of each sequence, one forward per sequence."""
    with torch.inference_mode():
        return [model(torch.tensor([s]))[0].float() for s in seqs]


@needs_kernel
@pytest.mark.parametrize("family,overrides", CASES)
def test_batched_steps_equal_the_torch_model_per_sequence(family, overrides, hf_folder):
    model, _ = paired(hf_folder, family, **overrides)
    seqs = sequences([23, 9, 3, 14])  # 23 wraps the sliding rings (4 + 16 positions)
    with torch.inference_mode():
        decoder = c_decode.batch_decoder(model, slot_cache(model, slots=5, capacity=24))
        assert decoder is not None
        # slot 1 left empty: a row's slot is its own, not its row's index
        got = decode_together(decoder, [seqs[3], [], *seqs[:3]])
    for g, want in zip([got[0], *got[2:]], torch_logits(model, [seqs[3], *seqs[:3]])):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("family,overrides", [CASES[2], CASES[4]])
def test_rows_in_a_batch_equal_rows_decoded_alone(family, overrides, hf_folder):
    """A row's logits do not depend on the other rows of its step (other slots, other
    lengths), bit for bit: the weight tiles (4 x 4 from 8 rows on, 1 x 4 below) give every
    output the same sums."""
    model, _ = paired(hf_folder, family, **overrides)
    seqs = sequences([21, 6, 13, 2, 17, 9, 9, 11, 5, 10], seed=1)  # steps of 10 rows down to 1
    with torch.inference_mode():
        together = decode_together(c_decode.batch_decoder(model, slot_cache(model, 13, 24)), seqs)
        for i, seq in enumerate(seqs):
            alone = c_decode.batch_decoder(model, slot_cache(model, 13, 24))
            got = torch.stack([alone.step([t], [i + 3], [p])[0].clone() for p, t in enumerate(seq)])
            assert torch.equal(got, together[i])


@needs_kernel
@pytest.mark.parametrize("family,overrides", [CASES[0], CASES[2], CASES[3]])
def test_rows_of_one_slot_at_consecutive_positions_equal_single_steps(family, overrides, hf_folder):
    """k rows of one slot in one step (a prefill chunk, speculative verification) see each
    other causally: they equal k one-row steps, across the sliding ring's wrap too, and a
    rewritten position (a rejected draft token) is simply overwritten."""
    model, _ = paired(hf_folder, family, **overrides)
    (seq,) = sequences([40], seed=2)
    with torch.inference_mode():
        one_by_one = decode_in_chunks(c_decode.batch_decoder(model, slot_cache(model, 2, 40)), seq, [1] * 40)
        chunked_decoder = c_decode.batch_decoder(model, slot_cache(model, 2, 40))
        chunked = decode_in_chunks(chunked_decoder, seq, [7, 1, 16, 16], slot=1)
        assert torch.equal(chunked, one_by_one)
        # roll back: positions 30.. rewritten with other tokens, then the true ones again
        chunked_decoder.step([5, 6, 7], [1, 1, 1], [30, 31, 32])
        again = chunked_decoder.step(seq[30:], [1] * 10, list(range(30, 40)))
        assert torch.equal(again, one_by_one[30:])
    torch.testing.assert_close(one_by_one, torch_logits(model, [seq])[0], rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("family,overrides", CASES[2:5])
def test_int8_and_bfloat16_weights(family, overrides, hf_folder):
    """int8 weight-only: the float model holding exactly the int8 weights, to float32
    summation order. bfloat16 (weights and cache): float32 maths on the same rounded weights,
    within what the bfloat16 cache costs (as in tests/test_c_decode.py)."""
    seqs = sequences([11, 5, 8], seed=3)
    int8, _ = paired(hf_folder, family, **overrides)
    quantize_model(int8, "int8")
    reference, _ = paired(hf_folder, family, **overrides)
    reference.load_state_dict(dequantized_state_dict(int8, torch.float32), strict=False)
    with torch.inference_mode():
        got = decode_together(c_decode.batch_decoder(int8, slot_cache(int8, 3, 12)), seqs)
    for g, want in zip(got, torch_logits(reference, seqs)):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-4)

    bf16, _ = paired(hf_folder, family, **overrides)
    bf16.to(torch.bfloat16)
    reference.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()}, strict=False)
    with torch.inference_mode():
        got = decode_together(c_decode.batch_decoder(bf16, slot_cache(bf16, 3, 12)), seqs)
    for g, want in zip(got, torch_logits(reference, seqs)):
        assert (g - want).abs().max() <= 0.02 * want.abs().max()


def _variant(flags):
    lib = kernel_build.compile_library(kernel_build.FLAGS + flags)
    if lib is None:
        pytest.skip("the compiler rejects " + " ".join(flags))
    return lib


@needs_kernel
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"])
def test_avx2_and_scalar_paths_give_the_same_numbers(flags, dtype, hf_folder):
    """The library built without AVX-512 (AVX2 tiles) and without AVX2 (scalar tiles) gives
    the default build's logits to float32 summation order."""
    model, _ = paired(hf_folder, "gemma3", **CASES[-1][1])
    if dtype == "int8":
        quantize_model(model, "int8")
    else:
        model.to(dtype)
    seqs = sequences([9, 4, 6, 6, 5, 7, 3, 8, 9], seed=4)  # 9 rows down to 2: wide and narrow tiles
    other = _variant(flags)
    with torch.inference_mode():
        want = decode_together(c_decode.batch_decoder(model, slot_cache(model, 9, 10)), seqs)
        decoder = c_decode.batch_decoder(model, slot_cache(model, 9, 10))
        decoder.lib = other
        got = decode_together(decoder, seqs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))


@needs_kernel
def test_batch_decoder_declines_what_it_cannot_run(hf_folder):
    from gemmakit.lora import apply_lora

    model, _ = paired(hf_folder, "gemma3")
    with torch.inference_mode():
        kv = slot_cache(model, 2, 8)
        assert c_decode.batch_decoder(model, kv) is not None
        assert c_decode.batch_decoder(model, [kv[0], None]) is None  # a layer without K/V
        assert c_decode.batch_decoder(model, [(k.bfloat16(), v.bfloat16()) for k, v in kv]) is None
        assert c_decode.batch_decoder(model, [(k[:, :, :, :8], v[:, :, :, :8]) for k, v in kv]) is None
    assert c_decode.batch_decoder(model, kv) is None  # gradients on
    apply_lora(model, r=4)
    with torch.inference_mode():
        assert c_decode.batch_decoder(model, kv) is None  # adapters


@needs_kernel
def test_rows_outside_the_cache_are_refused(hf_folder):
    model, _ = paired(hf_folder, "gemma3")
    with torch.inference_mode():
        decoder = c_decode.batch_decoder(model, slot_cache(model, 2, 8))
        assert decoder.step([5], [1], [7]).shape == (1, 256)
        for tokens, slots, positions in [
            ([5], [1], [8]),  # past the full layer's capacity
            ([5], [2], [0]),  # no such slot
            ([256], [0], [0]),  # no such token
            ([5, 6], [0], [0]),  # a slot per row
            ([], [], []),
        ]:
            with pytest.raises(ValueError):
                decoder.step(tokens, slots, positions)
