"""`TextStream`'s incremental detokenization gives the deltas of decoding the whole output at
every step (the definition), on the bundled Gemma tokenizer."""

from __future__ import annotations

import random

import pytest

from gemmakit.inference.text import TextStream


class WholeDecodeStream(TextStream):
    """The reference: every step decodes all the ids."""

    def _decode_new(self):
        return self.tokenizer.decode(self.ids), False


@pytest.fixture(scope="module")
def tokenizer():
    from gemmakit.loading import load_tokenizer, resolve

    return load_tokenizer(resolve(None))


def token_runs(tokenizer, seed: int, length: int) -> list[int]:
    """Text tokens, byte-fallback pieces of multi-byte characters, control tokens and stop
    strings, mixed."""
    rng = random.Random(seed)
    words = "the sea é 日本 🙂 END stop\n  x".split(" ") + ["\n", " ", "END", "ST"]
    ids = []
    while len(ids) < length:
        pick = rng.random()
        if pick < 0.7:
            ids += tokenizer.encode(rng.choice(words) + " ")
        elif pick < 0.85:
            ids.append(rng.choice(sorted(tokenizer.special_ids)))
        else:  # a character as raw bytes, possibly cut short
            ids += [tokenizer.token_id(f"<0x{b:02X}>") for b in "日🙂é".encode()[: rng.randint(1, 9)]]
    return [i for i in ids if i is not None][:length]


@pytest.mark.parametrize("stop", [[], ["END"], ["STOP", "sea é"]])
def test_incremental_deltas_equal_whole_decodes(tokenizer, stop):
    for seed in range(20):
        ids = token_runs(tokenizer, seed, 120)
        fast, slow = TextStream(tokenizer, stop), WholeDecodeStream(tokenizer, stop)
        for n, token in enumerate(ids):
            final = n == len(ids) - 1
            assert fast.push(token, final) == slow.push(token, final), (seed, n)
            assert fast.stopped == slow.stopped and fast.text == slow.text
        assert fast.flush() == slow.flush()


def test_a_long_stream_decodes_only_its_tail(tokenizer):
    """Each step decodes the new token and its context, not the whole output."""
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 100)
    decoded = []
    decode = tokenizer.decode

    class Counting:
        special_ids = tokenizer.special_ids

        def decode(self, some):
            decoded.append(len(some))
            return decode(some)

    stream = TextStream(Counting(), ["never"])
    text = "".join(stream.push(t) for t in ids) + stream.flush()
    assert text == decode(ids) and max(decoded) <= 4
