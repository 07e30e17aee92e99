"""The C step's argmax of each logit row (Batch.best, csrc/decode_batch.c): numpy's argmax of
the logits it writes, the lowest index of equal ones and the first NaN, whichever thread
computed which chunk of the head; and the torch-free path's greedy tokens taken from it."""

import numpy as np
import pytest
import torch

from gemmakit.inference import c_decode, step_structs
from tests.test_c_batch import needs_kernel, slot_cache
from tests.test_model import paired


def _step_with_best(decoder, tokens, slots, positions, threads):
    """One decode_batch call over the decoder's model and cache with Batch.best set:
    (logits, best) of every row."""
    rows = len(tokens)
    ids = torch.tensor([tokens, slots, positions], dtype=torch.int64)
    logits = torch.empty((rows, decoder.model.config.vocab_size))
    best = torch.full((rows,), -7, dtype=torch.int64)
    batch = step_structs.Batch(
        rows=rows, tokens=ids[0].data_ptr(), slots=ids[1].data_ptr(), positions=ids[2].data_ptr(),
        logits=logits.data_ptr(), best=best.data_ptr(),
    )  # fmt: skip
    step_structs.run_step(decoder.lib, decoder.spec, batch, threads)
    return logits, best


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_best_is_numpys_argmax_ties_and_nan_included(threads, hf_folder):
    """Rows 10, 100 and 200 of the tied head are one large row (equal largest logits, in the
    head's first, second and fourth chunk of 64 columns): the best is 10; with rows 150 and 70
    NaN as well, it is 70, as numpy's argmax says; on a random head, numpy's argmax too."""
    model, _ = paired(hf_folder, "gemma3")
    table = model.model.embed_tokens.weight
    tokens, slots, positions = [5, 6, 7, 8], [0, 0, 1, 2], [0, 1, 0, 0]
    with torch.inference_mode():
        decoder = c_decode.batch_decoder(model, slot_cache(model, 3, 16))
        logits, best = _step_with_best(decoder, tokens, slots, positions, threads)
        assert best.tolist() == np.argmax(logits.numpy(), axis=1).tolist()

        table[[10, 100, 200]] = table[250] * 400
        decoder = c_decode.batch_decoder(model, slot_cache(model, 3, 16))
        logits, best = _step_with_best(decoder, tokens, slots, positions, threads)
        assert torch.equal(logits[:, 10], logits[:, 200]) and torch.equal(logits[:, 10], logits[:, 100])
        assert best.tolist() == [10] * 4 == np.argmax(logits.numpy(), axis=1).tolist()

        table[[150, 70]] = float("nan")
        decoder = c_decode.batch_decoder(model, slot_cache(model, 3, 16))
        logits, best = _step_with_best(decoder, tokens, slots, positions, threads)
        assert best.tolist() == [70] * 4 == np.argmax(logits.numpy(), axis=1).tolist()


@needs_kernel
def test_the_torch_free_steps_best_is_the_argmax_of_their_logits():
    """On the bundled GGUF, each one-row step's `best` is numpy's argmax of its logits (what the
    greedy choice took before), and a prefill leaves none."""
    from gemmakit.inference import lean

    model = lean.load(None)
    if model is None:
        pytest.skip("the lean path does not run the bundled model here")
    step = model.step_for(16)
    token = int(np.argmax(step.prefill([2, 818, 5279, 529, 7001, 563])))
    assert step.best is None
    for _ in range(4):
        logits = step.step(token)
        assert step.best == int(np.argmax(logits))
        token = step.best
