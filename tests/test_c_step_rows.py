"""The batched C step with prompt rows: the output head for chosen rows only, runs of one slot
longer than its sliding ring, prompt chunks of any lengths beside decode rows, each row the
same as when it runs alone (csrc/decode_batch.c through c_decode.BatchDecoder)."""

import pytest
import torch

from gemmakit.inference import c_decode
from tests.test_c_batch import CASES, decode_in_chunks, needs_kernel, sequences, slot_cache, torch_logits
from tests.test_model import paired


@needs_kernel
@pytest.mark.parametrize("family,overrides", [CASES[0], CASES[3]])
def test_logits_of_chosen_rows_equal_those_of_a_full_step(family, overrides, hf_folder):
    """Only the chosen rows go through the last block's MLP and the head: their logits are
    the full step's rows, bit for bit, and the keys and values every row leaves in the cache
    are the same (the next step gives the same logits)."""
    model, _ = paired(hf_folder, family, **overrides)
    a, b, c = sequences([9, 5, 1], seed=5)
    tokens, slots, positions = a + b + c, [0] * 9 + [2] * 5 + [1], [*range(9), *range(5), 0]
    with torch.inference_mode():
        full_decoder = c_decode.batch_decoder(model, slot_cache(model, 3, 16))
        full = full_decoder.step(tokens, slots, positions).clone()
        chosen_decoder = c_decode.batch_decoder(model, slot_cache(model, 3, 16))
        for rows in ([8, 13, 14], [0], [3, 4]):
            chosen = chosen_decoder.step(tokens, slots, positions, logit_rows=rows)
            assert torch.equal(chosen, full[rows])
        chosen_decoder.step(tokens, slots, positions, logit_rows=[])  # no head at all: keys only
        following = ([7, 8], [0, 2], [9, 5])
        assert torch.equal(chosen_decoder.step(*following), full_decoder.step(*following))


@needs_kernel
@pytest.mark.parametrize("family,overrides", [CASES[2], CASES[3]])
def test_a_run_longer_than_the_sliding_ring_equals_single_steps(family, overrides, hf_folder):
    """A prompt chunk of 45 rows in one step, in a slot whose sliding rings hold 20 positions
    (window 4 + 16 spare): each row reads the positions before its chunk from the ring and
    those of its chunk from the step's own keys, so it equals the one-row steps, bit for bit,
    and the torch model; the ring ends holding the chunk's last positions."""
    model, _ = paired(hf_folder, family, **overrides)
    (seq,) = sequences([60], seed=6)
    with torch.inference_mode():
        one_by_one = decode_in_chunks(c_decode.batch_decoder(model, slot_cache(model, 2, 64)), seq, [1] * 60)
        chunked = decode_in_chunks(
            c_decode.batch_decoder(model, slot_cache(model, 2, 64)), seq, [3, 45, 12], 1
        )
    assert torch.equal(chunked, one_by_one)
    torch.testing.assert_close(chunked, torch_logits(model, [seq])[0], rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_chunks_of_any_lengths_beside_decode_rows_equal_each_alone(dtype, hf_folder):
    """One step holds decode rows, a speculation-like run and prompt chunks of 1, 6 and 23
    rows of other slots: every row with logits equals its own sequence fed one row a step."""
    model, _ = paired(hf_folder, "gemma3")
    model.to(dtype)
    seqs = sequences([30, 30, 30, 30, 30], seed=7)
    with torch.inference_mode():
        alone = [
            decode_in_chunks(c_decode.batch_decoder(model, slot_cache(model, 5, 32)), s, [1] * 30)
            for s in seqs
        ]
        decoder = c_decode.batch_decoder(model, slot_cache(model, 5, 32))
        for slot, held in ((0, 10), (1, 4), (2, 12)):  # rows already decoding
            decoder.step(seqs[slot][:held], [slot] * held, list(range(held)))
        runs = [(0, 10, 1), (1, 4, 3), (2, 12, 6), (3, 0, 23), (4, 0, 1)]  # (slot, from, rows)
        tokens = [t for slot, at, n in runs for t in seqs[slot][at : at + n]]
        slots = [slot for slot, _, n in runs for _ in range(n)]
        positions = [p for _, at, n in runs for p in range(at, at + n)]
        ends = [sum(n for _, _, n in runs[: i + 1]) - 1 for i in range(len(runs))]
        logits = decoder.step(tokens, slots, positions, logit_rows=ends)
    for (slot, at, n), row in zip(runs, logits):
        assert torch.equal(row, alone[slot][at + n - 1])


@needs_kernel
def test_rows_a_step_cannot_order_are_refused(hf_folder):
    model, _ = paired(hf_folder, "gemma3")
    with torch.inference_mode():
        decoder = c_decode.batch_decoder(model, slot_cache(model, 2, 8))
        for tokens, slots, positions, rows in [
            ([5, 6, 7], [0, 1, 0], [0, 0, 1], None),  # slot 0's rows split by another slot's
            ([5, 6], [0, 0], [0, 2], None),  # a gap between positions of one slot
            ([5, 6], [0, 1], [0, 0], [1, 0]),  # logit rows out of order
            ([5, 6], [0, 1], [0, 0], [2]),  # no such row
        ]:
            with pytest.raises(ValueError):
                decoder.step(tokens, slots, positions, logit_rows=rows)


@needs_kernel
@pytest.mark.parametrize("family,overrides", [CASES[2], CASES[3]])
def test_one_sequence_prefilled_in_c_equals_its_one_token_steps(family, overrides, hf_folder, monkeypatch):
    """CDecoder.prefill (generate's prefill on the C step) over the torch model's KVCache: the
    last logits and the keys and values it leaves (the next step's logits) are the one-token
    steps', bit for bit, however the prompt is cut into steps; the torch model's within
    float32 summation order."""
    model, _ = paired(hf_folder, family, **overrides)
    (seq,) = sequences([50], seed=8)  # past the sliding ring (window 4)
    with torch.inference_mode():
        stepped = c_decode.decoder(model, model.make_cache(1, 60), 1)
        for t in seq:
            last = stepped.step(t).clone()
        after = stepped.step(7).clone()
        for rows in (512, 7):
            monkeypatch.setattr(c_decode, "PREFILL_ROWS", rows)
            prefilled = c_decode.decoder(model, model.make_cache(1, 60), 1)
            assert torch.equal(prefilled.prefill(seq), last)
            assert prefilled.cache.length == 50 and prefilled.prefill(seq) is None  # the cache is in use
            assert torch.equal(prefilled.step(7), after)
        want = torch_logits(model, [seq])[0][-1]
    torch.testing.assert_close(last[0], want, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_a_slot_prefilled_in_c_equals_its_one_row_steps(hf_folder, monkeypatch):
    """BatchDecoder.prefill (speculative generation's prompt): a prompt, then the rest of it
    from a later start, in steps of PREFILL_ROWS rows, leave the logits and keys of one-row
    steps; rows the cache cannot hold are refused before anything runs."""
    model, _ = paired(hf_folder, "gemma3")
    (seq,) = sequences([30], seed=9)
    monkeypatch.setattr(c_decode, "PREFILL_ROWS", 8)
    with torch.inference_mode():
        want = decode_in_chunks(
            c_decode.batch_decoder(model, slot_cache(model, 2, 32)), seq, [1] * 30, slot=1
        )
        decoder = c_decode.batch_decoder(model, slot_cache(model, 2, 32))
        assert torch.equal(decoder.prefill(seq[:11], 1)[0], want[10])
        assert torch.equal(decoder.prefill(seq[11:], 1, start=11)[0], want[29])
        with pytest.raises(ValueError):
            decoder.prefill(seq, 2)  # no such slot
        with pytest.raises(ValueError):
            decoder.prefill(seq + seq, 0)  # past the slot's capacity


@needs_kernel
@pytest.mark.parametrize("family,overrides", [CASES[1], CASES[3], CASES[4], CASES[5]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_is_the_same_on_any_number_of_threads(family, overrides, dtype, hf_folder):
    """A one-row step splits its attention over the threads (the positions for the scores,
    the columns for the weighted sums); a longer run gives each thread whole blocks of rows.
    A sequence fed one row a step or in chunks that cut its blocks anywhere, on 1, 2 or 3
    threads, gives the same logits bit for bit (MHA, MQA, GQA; a head size that leaves a tail)."""
    model, _ = paired(hf_folder, family, **overrides)
    model.to(dtype)
    (seq,) = sequences([40], seed=8)
    before = torch.get_num_threads()
    results = []
    try:
        with torch.inference_mode():
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                for chunks in ([1] * 40, [17, 1, 1, 21]):
                    decoder = c_decode.batch_decoder(model, slot_cache(model, 2, 48))
                    results.append(decode_in_chunks(decoder, seq, chunks, 1))
    finally:
        torch.set_num_threads(before)
    for got in results[1:]:
        assert torch.equal(got, results[0])


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_the_bundled_gguf_rounds_each_input_once_with_the_same_bits(threads):
    """A step rounds each input to 8-bit blocks once for the products that read it (q/k/v,
    gate/up): from 16 rows on once for all threads, the rows split between them, below by each
    thread for itself. On the bundled file's own types (Q5_0 and Q8_0 read Q8_0 blocks, Q4_K
    and Q6_K Q8_K blocks) a 24-row prompt chunk gives every row the logits of one-row steps,
    bit for bit."""
    from gemmakit.loading import load

    model = load().model
    (seq,) = sequences([24], seed=9)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            one_by_one = decode_in_chunks(
                c_decode.batch_decoder(model, slot_cache(model, 1, 32)), seq, [1] * 24
            )
            chunk = decode_in_chunks(c_decode.batch_decoder(model, slot_cache(model, 1, 32)), seq, [24])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(chunk, one_by_one)


@needs_kernel
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2")])
def test_attention_without_avx512_is_the_same_on_any_number_of_threads(flags, hf_folder):
    """The AVX2 and scalar builds' attention (their own sums of a tile's dots) also gives a
    row the same bits on 1 or 2 threads: split over them (one row a step) or in whole blocks
    (a chunk). (The scalar build's float32 products can differ in the last bit between a
    chunk and one-row steps, and between column ranges split over 3 threads, before this
    attention too: each chunking is compared with itself, on 1 and 2 threads.)"""
    from tests.test_c_batch import _variant

    model, _ = paired(hf_folder, "gemma3")
    (seq,) = sequences([30], seed=10)
    lib = _variant(flags)
    before = torch.get_num_threads()
    results = {}
    try:
        with torch.inference_mode():
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for chunks in ([1] * 30, [13, 1, 16]):
                    decoder = c_decode.batch_decoder(model, slot_cache(model, 2, 32))
                    decoder.lib = lib
                    results[threads, len(chunks)] = decode_in_chunks(decoder, seq, chunks, 1)
    finally:
        torch.set_num_threads(before)
    for (_, chunking), got in results.items():
        assert torch.equal(got, results[1, chunking])
