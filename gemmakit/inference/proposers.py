"""Where speculative proposals come from, and when to stop asking for them.

`NgramProposer` is prompt lookup (transformers' `prompt_lookup_num_tokens`, vLLM's and
llama.cpp's n-gram speculation): the last n tokens (n = 3, then 2, then 1) are looked up in
the prompt and the output so far, and the tokens that followed their latest earlier
occurrence are proposed. Its proposals are deterministic: their q is one-hot. `DraftProposer`
runs a smaller model with the same vocabulary, which keeps its own KV cache in step with the
target's output by rolling back what the target rejected. `MtpProposer` runs Gemma 4's MTP
drafter (`model/gemma4_assistant.py`) over the target's own last hidden state and keys: no
cache or prefill of its own. `Backoff` decides how many tokens
to ask for: fewer, then none for a while, as proposals stop being accepted, so that a text
with nothing to copy decodes nearly as fast as without speculation.
"""

from __future__ import annotations

import torch

from gemmakit.config import SLIDING
from gemmakit.errors import GemmakitError
from gemmakit.inference import c_decode, sampler
from gemmakit.inference.engine import Request
from gemmakit.inference.sampling import probabilities
from gemmakit.model.cache import RING_SLACK

# A verification that kept fewer proposals than this did not pay for itself: a step of 1 + k
# rows costs more than a one-row step (the batched C step reads the weights once but computes
# k more rows; the torch forward, where C does not apply, costs several C steps), so it has
# to gain about two tokens to be worth running (benchmarks/speculative.py shows the balance).
MIN_USEFUL_ACCEPTED = 2
# The longest pause (in target steps) between two tries after proposals kept failing: a
# failed try then costs at most about 1/64 of the steps in a text with nothing to copy.
MAX_WAIT = 64


class Backoff:
    """How many tokens to propose at the next step, from how earlier proposals fared.

    All proposals kept: ask for twice as many next time (up to `k_max`); some rejected: ask
    for one more than were kept. A try that kept fewer than MIN_USEFUL_ACCEPTED makes the
    next `penalty` steps propose nothing and doubles the penalty (up to MAX_WAIT); a useful
    one halves it. The decision depends only on the tokens, so a seeded request is
    reproducible.
    """

    def __init__(self, k_max: int, min_useful: int = MIN_USEFUL_ACCEPTED):
        self.k_max, self.min_useful = k_max, min_useful
        self.k, self.wait, self.penalty = k_max, 0, 1

    def budget(self) -> int:
        """The number of tokens to propose at this step (0: decode without speculation)."""
        if self.wait > 0:
            self.wait -= 1
            return 0
        return self.k

    def update(self, accepted: int, proposed: int):
        if proposed == 0:
            return
        self.k = min(self.k_max, 2 * self.k) if accepted == proposed else max(1, accepted + 1)
        if accepted < min(self.min_useful, proposed):
            self.wait, self.penalty = self.penalty, min(MAX_WAIT, 2 * self.penalty)
        else:
            self.penalty = max(1, self.penalty // 2)


class NgramProposer:
    """Prompt lookup over the prompt and the output so far (see the module docstring).

    An index maps each n-gram (n <= MAX_N) to the position of the token after its latest
    occurrence; it grows with the output, so a step costs the new tokens, not the context.
    """

    MAX_N = 3

    def __init__(self):
        self._after: dict[tuple[int, ...], int] = {}
        self._next_end = 1

    def propose(self, request: Request, k: int) -> tuple[list[int], None]:
        """Up to `k` tokens that followed the longest suffix seen before; q None (one-hot)."""
        ids = request.prompt_ids + request.output_ids
        for end in range(self._next_end, len(ids)):  # grams followed by a token
            for n in range(1, min(self.MAX_N, end) + 1):
                self._after[tuple(ids[end - n : end])] = end
        self._next_end = max(self._next_end, len(ids))
        for n in range(min(self.MAX_N, len(ids)), 0, -1):
            at = self._after.get(tuple(ids[-n:]))
            if at is not None:
                return ids[at : at + k], None
        return [], None

    def update(self, accepted: int, proposed: int):
        """Nothing to keep in step: the index only ever grows with accepted tokens."""


def cache_rows(model, cache) -> c_decode.BatchDecoder | None:
    """The batched C step over a one-row KVCache as its slot 0, or None where it does not
    apply (then `feed` runs the torch model)."""
    return c_decode.batch_decoder(model, [None if c is None else (c.k, c.v) for c in cache.for_layer])


def feed(model, cache, rows_step: c_decode.BatchDecoder | None, tokens: list[int]) -> torch.Tensor:
    """Runs `tokens` into a one-row cache whose every column holds a token (no padding: a
    speculative cache); the logits (len(tokens), V) after each. In C when `rows_step` (from
    `cache_rows`) is given: its rows see each other causally, as the torch model's do."""
    if rows_step is not None:
        start = cache.length
        logits = rows_step.step(tokens, [0] * len(tokens), list(range(start, start + len(tokens))))
        for _ in tokens:  # the cache's bookkeeping of the columns the step wrote
            cache.append_dense()
        return logits
    ids = torch.tensor([tokens], dtype=torch.long, device=model.device)
    return model(ids, cache=cache)[0]


class DraftProposer:
    """A draft model proposing k tokens one at a time, with its own KV cache.

    The cache holds a prefix of the request's tokens: after proposing d1..dk it holds the
    sequence and d1..d(k-1); `update` drops the proposals the target rejected, so the next
    `propose` feeds only what the draft has not seen (the corrected or bonus token).
    Greedy requests propose the draft's argmax; sampled ones draw from the draft's own
    distribution under the request's filters, which is the q speculative sampling divides by.
    """

    def __init__(self, model, max_length: int):
        self.model = model
        self.cache = model.make_cache(1, max_length, ring_slack=RING_SLACK)
        self.rows_step = cache_rows(model, self.cache)

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        """Runs tokens into the draft's cache; the logits (V,) after the last one."""
        if self.cache.length == 0 or len(tokens) > RING_SLACK + 1:  # a prompt: the torch prefill
            ids = torch.tensor([tokens], dtype=torch.long, device=self.model.device)
            # the head on the last row only: every row's logits cost a (T, V) product (a
            # 512-token prompt and a 262k vocabulary: ~86 G multiply-adds) for one row's use
            return self.model.logits(self.model.hidden_states(ids, cache=self.cache)[0, -1:])[0]
        return feed(self.model, self.cache, self.rows_step, tokens)[-1]

    def propose(self, request: Request, k: int) -> tuple[list[int], torch.Tensor | None]:
        """k proposed tokens and, for a sampled request, their distributions q (k, V)."""
        params = request.params
        logits = self._feed((request.prompt_ids + request.output_ids)[self.cache.length :])
        proposals, qs = [], []
        for i in range(k):
            if params.greedy:
                proposals.append(int(logits.float().argmax()))
            else:
                q = probabilities(logits, params)
                proposals.append(sampler.draw_index(q.double().cpu().numpy(), request.generator))
                qs.append(q)
            if i + 1 < k:
                logits = self._feed(proposals[-1:])
        return proposals, torch.stack(qs) if qs else None

    def update(self, accepted: int, proposed: int):
        """Keeps the accepted proposals the cache holds (it never holds the last one)."""
        if proposed:
            self.cache.rollback(proposed - 1 - min(accepted, proposed - 1))


class MtpProposer:
    """Gemma 4's MTP drafter (`model/gemma4_assistant.py`) proposing k tokens from the
    target's own state: no cache of its own, no prefill.

    For the token at position p (the last one chosen, not yet fed to the target) it reads
    the target's final-normed hidden state that predicted that token and the keys and values
    the target's last full-attention and last sliding layer hold for positions before p (the
    sliding ones: the last window + 1, all the drafter's mask keeps). Each drafting step feeds
    [target embedding of the token, that hidden state] at position p and gives the next
    token and the projected state for the step after it, as transformers'
    Gemma4AssistantCandidateGenerator does; the position and the target's keys stay fixed
    for the round. The caller hands over the target's hidden states after each forward
    (`observe`) and says how many proposals were kept (`update`): the state that predicted
    the next round's first token is the row of the last kept token.
    """

    needs_hidden = True

    def __init__(self, target, assistant, read_kv):
        check_assistant(target, assistant)
        self.target, self.assistant, self.read_kv = target, assistant, read_kv
        c = target.config
        first_shared = c.num_hidden_layers - c.num_kv_shared_layers
        # The layer of each type whose keys the target keeps last (transformers' "store" layers).
        self.sources = {t: i for i, t in enumerate(c.layer_types[:first_shared])}
        self._rows, self._kept = None, 0

    def observe(self, hidden_rows: torch.Tensor):
        """The target's final hidden states (T, C) after the rows it was just fed."""
        self._rows, self._kept = hidden_rows, 0

    def _target_kv(self, p: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per layer type, the source layer's keys and values of positions [0, p) (sliding:
        the last window + 1 of them), oldest first."""
        kv, window = {}, self.target.config.sliding_window
        for layer_type, i in self.sources.items():
            first = max(0, p - window - 1) if layer_type == SLIDING else 0
            kv[layer_type] = self.read_kv(i, torch.arange(first, p, device=self.target.device))
        return kv

    def propose(self, request: Request, k: int) -> tuple[list[int], torch.Tensor | None]:
        """k proposed tokens and, for a sampled request, their distributions q (k, V)."""
        params, target = request.params, self.target
        ids = request.prompt_ids + request.output_ids
        p, token = len(ids) - 1, ids[-1]  # the last token's position: the target's next row
        kv = self._target_kv(p)
        hidden = self._rows[self._kept].view(1, 1, -1)
        position = torch.tensor([[p]], device=target.device)
        proposals, qs = [], []
        for _ in range(k):
            ids = torch.tensor([[token]], device=target.device)
            embedding = target.embed(target.model.embed_tokens, ids, target.config.embedding_scale)
            logits, hidden = self.assistant(
                torch.cat((embedding, hidden.to(embedding.dtype)), -1), position, kv
            )
            logits = logits[0, 0].float()
            if params.greedy:
                token = int(logits.argmax())
            else:
                q = probabilities(logits, params)
                token = sampler.draw_index(q.double().cpu().numpy(), request.generator)
                qs.append(q)
            proposals.append(token)
        return proposals, torch.stack(qs) if qs else None

    def update(self, accepted: int, proposed: int):
        """The next round starts from the row of the last kept token (the corrected or bonus
        token was chosen from it)."""
        self._kept = min(accepted, proposed)


def kv_cache_reader(cache):
    """`MtpProposer`'s reader of a one-row KVCache: layer i's (keys, values) (1, K, n, D) at
    the given positions (its columns)."""

    def read(i: int, cols: torch.Tensor):
        layer = cache.for_layer[i]
        slots = cols % layer.group.capacity
        if not bool((layer.group.slot_cols[slots] == cols).all()):
            raise RuntimeError("the target's cache no longer holds the keys the drafter reads")
        return layer.k[:, :, slots], layer.v[:, :, slots]

    return read


def slot_cache_reader(cache, slot: int):
    """`MtpProposer`'s reader of one slot of the engine's SlotCache (position p at index
    p % the layer's capacity; the caller keeps the positions read inside the ring)."""

    def read(i: int, positions: torch.Tensor):
        layer = cache.for_layer[i]
        index = positions % layer.plan.capacity
        return layer.k[slot : slot + 1, :, index], layer.v[slot : slot + 1, :, index]

    return read


def check_assistant(target, assistant):
    """Refuses an MTP drafter that cannot read this target's state.

    Raises:
        GemmakitError: other vocabulary or hidden width, or attention shapes that do not
            match the target's last layer of each type.
    """
    from gemmakit.model.gemma4_assistant import Gemma4Assistant

    if not isinstance(assistant, Gemma4Assistant):
        raise GemmakitError("speculative='mtp' needs a Gemma 4 assistant model (a gemma4_assistant folder)")
    c, a = target.config, assistant.config
    if a.backbone_hidden_size != c.hidden_size or a.text.vocab_size != c.vocab_size:
        raise GemmakitError(
            f"the assistant was made for a target of width {a.backbone_hidden_size} and "
            f"{a.text.vocab_size} tokens; this model has {c.hidden_size} and {c.vocab_size}"
        )
    first_shared = c.num_hidden_layers - c.num_kv_shared_layers
    sources = {t: i for i, t in enumerate(c.layer_types[:first_shared])}
    for j, layer_type in enumerate(a.text.layer_types):
        i = sources.get(layer_type)
        heads = a.text.num_attention_heads
        if i is None or a.text.layer_head_dim(j) != c.layer_head_dim(i) or heads % c.layer_kv_heads(i):
            raise GemmakitError(
                f"the assistant's layer {j} ({layer_type}) cannot attend over this model's keys "
                "and values (no such layer, or another head size): it belongs to another target"
            )


def check_draft(target, target_tokenizer, draft, draft_tokenizer):
    """Refuses a draft model whose tokens are not the target's.

    Raises:
        GemmakitError: the vocabularies (the tokenizers' pieces or the logit widths) differ.
    """
    if target_tokenizer.pieces != draft_tokenizer.pieces:
        raise GemmakitError(
            f"the draft model's tokenizer ({draft_tokenizer.vocab_size} tokens) is not the "
            f"target's ({target_tokenizer.vocab_size} tokens): a draft must share the vocabulary"
        )
    if target.config.vocab_size != draft.config.vocab_size:
        raise GemmakitError(
            f"the draft model has {draft.config.vocab_size} logits, the target "
            f"{target.config.vocab_size}: a draft must share the vocabulary"
        )
