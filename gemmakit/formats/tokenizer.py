"""Gemma tokenization from `tokenizer.model`, `tokenizer.json` or a GGUF vocabulary.

Gemma's tokenizer is a SentencePiece BPE model (no dummy prefix, byte fallback, user-defined
pieces for runs of spaces, tabs and newlines). A GGUF file carries the same pieces, scores and
types, so we rebuild the SentencePiece model proto from them instead of deriving BPE merges
as transformers does (measured on Gemma 3's 262k pieces: 0.3 s against 12 s). A Gemma 4 GGUF
from llama.cpp's converter stores a BPE vocabulary with merges instead (tokenizer model
"gemma4"), tokenized here as llama.cpp tokenizes it. Control tokens written in the text
(`<start_of_turn>`) are recognized as such, as transformers' added tokens are.

Chat: the checkpoint's own Jinja template (`formats.chat_template`) when it has one, rendered
as transformers renders it; otherwise Gemma 1/2/3's turn format (`render_chat`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from gemmakit.errors import ModelFileError
from gemmakit.formats import chat_template as templates
from gemmakit.formats import sentencepiece_bpe, tokenizer_cache
from gemmakit.formats.chat_template import ChatTemplate, ChatTemplateError

# SentencePiece piece types (sentencepiece_model.proto); GGUF token types use the same ids.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space
# The tokens that close a model turn: Gemma 1-3 (and 3n) write <end_of_turn>, Gemma 4 <turn|>
# (its tokenizer_config.json's eot_token), so generation stops there without a generation config.
END_OF_TURN = ("<end_of_turn>", "<turn|>")


class Tokenizer:
    """Encodes text to Gemma token ids and back.

    Attributes:
        bos_id, eos_id, pad_id: special ids, resolved by their token strings.
        stop_ids: ids that end generation: `<eos>` and the end-of-turn tokens present
            (`END_OF_TURN`).
        chat_template: the checkpoint's own chat template, or None (Gemma's format is used).
    """

    def __init__(
        self,
        backend,
        pieces: list[str],
        types: list[int] | None = None,
        chat_template: ChatTemplate | None = None,
    ):
        types = types or [NORMAL] * len(pieces)
        self._pieces, self._types = pieces, types
        self._piece_ids: dict[str, int] | None = {p: i for i, p in enumerate(pieces)}
        control = [p for p, t in zip(pieces, types) if t == CONTROL]
        self._setup(backend, len(pieces), {p: self._ids[p] for p in control}, self._ids.get, chat_template)

    @classmethod
    def _with_lazy_vocabulary(
        cls, backend, vocab_size: int, control: dict[str, int], find, vocabulary, chat_template
    ) -> Tokenizer:
        """A tokenizer whose `pieces` and `types` lists are made by `vocabulary()` when first
        read: encoding and decoding need only the backend, the control pieces and the ids of
        a few named pieces (`find(piece)`, None when absent), and 262k Python strings cost
        ~0.1 s and ~30 MB that most runs never use."""
        tok = cls.__new__(cls)
        tok._pieces = tok._types = tok._piece_ids = None
        tok._vocabulary = vocabulary
        tok._setup(backend, vocab_size, control, find, chat_template)
        return tok

    def _setup(self, backend, vocab_size: int, control: dict[str, int], find, chat_template):
        self._backend = backend  # a SentencePieceProcessor, or a tokenizers.Tokenizer
        self.vocab_size = vocab_size
        self._control = control
        self._control_re = _control_pattern(list(control))

        def named(piece: str, default: int | None) -> int | None:
            found = find(piece)
            return default if found is None else found

        self.bos_id = named("<bos>", 2)
        self.eos_id = named("<eos>", 1)
        self.pad_id = named("<pad>", 0)
        self.end_of_turn_id = named("<end_of_turn>", None)
        self.start_of_turn_id = named("<start_of_turn>", None)
        turn_ends = (find(p) for p in END_OF_TURN)
        self.stop_ids = tuple(i for i in (self.eos_id, *turn_ends) if i is not None)
        self.special_ids = frozenset(control.values())
        self._special_pieces = {i: p for p, i in control.items()}
        self.chat_template = chat_template
        # llama.cpp's gemma4 vocabulary: the control, unknown and user-defined pieces cut out
        # first, then the newline runs that are tokens, taken whole before BPE.
        self._kept_pieces: dict[str, int] = {}
        self._kept_re = None
        self._newline_runs: dict[str, int] = {}

    @property
    def backend(self):
        """The library tokenizer underneath: a SentencePieceProcessor (whose model proto the
        writers copy), or a `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def pieces(self) -> list[str]:
        """Every token's string, by id (user-defined pieces with real spaces, as the file has them)."""
        if self._pieces is None:
            self._pieces, self._types = self._vocabulary()
        return self._pieces

    @property
    def types(self) -> list[int]:
        """Every token's SentencePiece type (NORMAL, CONTROL, ...), by id."""
        if self._types is None:
            self._pieces, self._types = self._vocabulary()
        return self._types

    @property
    def _ids(self) -> dict[str, int]:
        if self._piece_ids is None:
            self._piece_ids = {p: i for i, p in enumerate(self.pieces)}
        return self._piece_ids

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, source: str = "GGUF", in_place: bool = False) -> Tokenizer:
        """The tokenizer of a GGUF header's vocabulary. With `in_place`, a SentencePiece
        vocabulary is run by `sentencepiece_bpe.SentencePieceBPE` over the mapped file (the
        same ids, a few MB instead of SentencePiece's ~38 MiB; no model proto for the
        writers: the torch-free generation path's choice) where it applies."""
        model = metadata.get("tokenizer.ggml.model")
        if model == "gemma4":
            return cls._from_gguf_bpe(metadata, source)
        if model not in ("llama", None):
            raise ModelFileError(
                f"{source}: tokenizer model {model!r} is neither SentencePiece ('llama') nor 'gemma4'"
            )
        for key in (_TOKENS, _SCORES, _TOKEN_TYPES):
            if key not in metadata:
                raise ModelFileError(f"{source}: no tokenizer in the file (missing {key})")
        if in_place and (backend := sentencepiece_bpe.build(metadata, source)) is not None:
            return cls._from_sentencepiece(backend, metadata, source)
        folder = tokenizer_cache.entry_folder(metadata)
        cached = _cached_sentencepiece(folder, metadata)
        if cached is not None:
            return cls._from_sentencepiece(cached, metadata, source)
        pieces, types = _gguf_vocabulary(metadata)
        scores = [float(s) for s in metadata[_SCORES]]
        # llama.cpp writes user-defined whitespace pieces with real spaces; SentencePiece
        # matches them after escaping spaces, so escape them back. Gemma's tokenizers never
        # add a dummy prefix, whatever add_space_prefix says (some GGUFs say 1; transformers
        # and Google's tokenizer.model do not prefix: "Hello" -> [9259], not "▁Hello").
        pieces_sp = [p.replace(" ", SPACE) if t == USER_DEFINED else p for p, t in zip(pieces, types)]
        proto = _sentencepiece_proto(pieces_sp, scores, types)
        backend = _load_sentencepiece(proto, source)
        tokenizer_cache.write_model(folder, proto, source)
        template = templates.from_gguf_metadata(metadata, pieces, source)
        return cls(backend, pieces, types, template)

    @classmethod
    def _from_sentencepiece(cls, sp, metadata, source: str) -> Tokenizer:
        """The tokenizer of a GGUF vocabulary whose SentencePiece model is already built (the
        cache), without decoding the pieces: the control pieces come from the file's types
        and the model (SentencePiece stores them unescaped), the named ids from the model,
        which refuses duplicate pieces, so a piece's id there is the only one."""
        import numpy as np

        size = sp.GetPieceSize()  # the file's token count (`_cached_sentencepiece` checked)
        types = np.asarray(metadata[_TOKEN_TYPES])[:size]
        control_ids = np.flatnonzero(types == CONTROL).tolist()
        control = dict(zip(sp.IdToPiece(control_ids), control_ids)) if control_ids else {}
        view = _SentencePieces(sp, types, metadata)
        template = templates.from_gguf_metadata(metadata, view, source)
        return cls._with_lazy_vocabulary(
            sp, size, control, view.find, lambda: _gguf_vocabulary(metadata), template
        )

    @classmethod
    def _from_gguf_bpe(cls, metadata: dict, source: str) -> Tokenizer:
        """llama.cpp's "gemma4" vocabulary: SentencePiece-style BPE with merges.

        llama.cpp (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GEMMA4) tokenizes it as follows:
        control, unknown and user-defined tokens are cut out of the text first; in the rest,
        spaces become "▁"; the text splits into newline runs and what lies between them; a
        newline run that is itself a token is that token; everything else is merged by BPE
        rank over UTF-8 characters, and a symbol outside the vocabulary becomes its <0xNN>
        byte tokens. `_newline_runs` does the newline-run rule, the backend the rest.
        """
        try:
            pieces = [str(p) for p in metadata["tokenizer.ggml.tokens"]]
            types = [int(t) for t in metadata["tokenizer.ggml.token_type"]]
            merges = [str(m) for m in metadata["tokenizer.ggml.merges"]]
        except KeyError as e:
            raise ModelFileError(f"{source}: no gemma4 tokenizer in the file (missing {e.args[0]})") from None
        if len(types) != len(pieces):
            raise ModelFileError(f"{source}: {len(pieces)} tokens but {len(types)} token types")
        # llama.cpp's converter (LlamaHfVocab) marks every added token of transformers' Gemma
        # tokenizer as control, whitespace runs ("\n\n", "▁▁") included: they are text, so they
        # are user-defined here and decode as text. Encoding is unchanged (llama.cpp cuts both
        # kinds out of the text the same way).
        types = [
            USER_DEFINED if t == CONTROL and p and not p.strip(f"\n\t {SPACE}") else t
            for p, t in zip(pieces, types)
        ]
        template = templates.from_gguf_metadata(metadata, pieces, source)
        tok = cls(_bpe_backend(pieces, types, merges, source), pieces, types, template)
        # The last id of a repeated piece wins, as in llama.cpp's token_to_id map.
        ids = {p: i for i, p in enumerate(pieces) if p}
        tok._newline_runs = {p: i for p, i in ids.items() if not p.strip("\n")}
        kept = [p for p, t in zip(pieces, types) if p and t in (CONTROL, UNKNOWN, USER_DEFINED)]
        tok._kept_pieces = {p: ids[p] for p in kept}
        tok._kept_re = _kept_pattern(kept)
        return tok

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Loads `tokenizer.model` (SentencePiece) or `tokenizer.json` (HF tokenizers)."""
        path = Path(path)
        if path.name.endswith(".json"):
            return cls._from_tokenizer_json(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelFileError(f"{path}: no such file") from None
        sp = _load_sentencepiece(data, str(path))
        # Pieces and types from the proto itself, in one pass (asking the processor per id
        # costs twice as long, and it has no is_user_defined(): the whitespace-run pieces
        # would come back NORMAL).
        from sentencepiece import sentencepiece_model_pb2 as pb

        entries = pb.ModelProto.FromString(data).pieces
        pieces, types = [p.piece for p in entries], [p.type for p in entries]
        return cls(sp, pieces, types)

    @classmethod
    def _from_tokenizer_json(cls, path: Path) -> Tokenizer:
        import tokenizers

        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ModelFileError(f"{path}: not a valid tokenizer.json ({e})") from None
        vocab = backend.get_vocab(with_added_tokens=True)
        pieces = [""] * (max(vocab.values()) + 1)
        for p, i in vocab.items():
            pieces[i] = p
        types = [NORMAL] * len(pieces)
        for i, tok in backend.get_added_tokens_decoder().items():
            types[i] = CONTROL if tok.special else USER_DEFINED
        return cls(backend, pieces, types)

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        """The folder's tokenizer.model (or tokenizer.json) with its chat template, if any."""
        for name in ("tokenizer.model", "tokenizer.json"):
            if (folder / name).exists():
                tok = cls.from_file(folder / name)
                tok.chat_template = templates.from_folder(folder, tok.pieces)
                return tok
        raise ModelFileError(f"{folder}: no tokenizer.model or tokenizer.json")

    # --- encoding -------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, with exactly one BOS in front when `add_bos`.

        A leading `<bos>` already in the text is not doubled (a common Gemma pitfall when a
        chat template emits it too).
        """
        # a lone surrogate (a command-line byte that is not UTF-8) is a one-line error on every
        # backend, not SentencePiece's pybind RuntimeError
        sentencepiece_bpe.utf8_text(text)
        ids: list[int] = []
        pos = 0
        for m in self._control_re.finditer(text) if self._control_re else ():
            token_id = self._control.get(m.group(0))
            if token_id is None:
                continue
            ids += self._encode_plain(text[pos : m.start()])
            ids.append(token_id)
            pos = m.end()
        ids += self._encode_plain(text[pos:])
        if add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        if self._kept_re is None:
            return self._encode_newline_runs(text) if self._newline_runs else self._encode_backend(text)
        ids: list[int] = []
        pos = done = 0
        while (m := self._kept_re.search(text, pos)) is not None:
            token_id = self._kept_pieces.get(m.group(0))
            if token_id is None:  # a "<...>" candidate that is no token: look on from its next char
                pos = m.start() + 1
                continue
            ids += self._encode_newline_runs(text[done : m.start()])
            ids.append(token_id)
            pos = done = m.end()
        return ids + self._encode_newline_runs(text[done:])

    def _encode_newline_runs(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in re.split(r"(\n+)", text):
            run = self._newline_runs.get(part)
            ids += [run] if run is not None else self._encode_backend(part)
        return ids

    def _encode_backend(self, text: str) -> list[int]:
        if not text:
            return []
        if hasattr(self._backend, "encode_as_ids"):
            return self._backend.encode_as_ids(text)
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
            return self._decode_plain(ids)
        # Control tokens decode to nothing in SentencePiece; write them out literally.
        out, run = [], []
        for i in ids:
            if i in self.special_ids:
                out.append(self._decode_plain(run))
                out.append(self._special_pieces[i])
                run = []
            else:
                run.append(i)
        out.append(self._decode_plain(run))
        return "".join(out)

    def _decode_plain(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if hasattr(self._backend, "decode_ids"):
            return self._backend.decode_ids(ids)
        return self._backend.decode(ids, skip_special_tokens=False)

    def token_id(self, piece: str) -> int | None:
        return self._ids.get(piece)

    # --- chat -----------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation as text, BOS included, ready for `encode` (which adds no second BOS).

        With the checkpoint's own template, exactly what transformers' `apply_chat_template(...,
        tokenize=False)` renders; `kwargs` become template variables (`tools=[...]`,
        `enable_thinking=True`). Without one, Gemma's format (`render_chat`), which has no
        variables: kwargs are ignored there, as a template that does not read them would.

        Raises:
            ChatTemplateError (a ValueError): the template rejected the conversation.
        """
        if self.chat_template is not None:
            return self.chat_template.render(messages, add_generation_prompt, **kwargs)
        return render_chat(messages, add_generation_prompt)


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Gemma's chat format, for a checkpoint without a template of its own.

    `<start_of_turn>user\\n…<end_of_turn>\\n<start_of_turn>model\\n…`; "assistant" is
    written as "model"; a system message is folded into the first user turn, as Gemma 3's
    template does (Gemma 1/2 templates reject the role outright).

    Raises:
        ChatTemplateError (a ValueError): a conversation Gemma's format cannot express.
    """
    system = ""
    turns = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if isinstance(content, list):  # OpenAI content parts
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        if not isinstance(content, str):
            raise ChatTemplateError(f"message {i}: content must be a string")
        if role == "system":
            if i != 0:
                raise ChatTemplateError("a system message may only come first")
            system = content + "\n\n"
            continue
        if role not in ("user", "assistant", "model"):
            raise ChatTemplateError(f"message {i}: unknown role {role!r} (user, assistant or system)")
        turns.append(("model" if role in ("assistant", "model") else "user", content))
    if turns and system:
        if turns[0][0] != "user":
            raise ChatTemplateError("after a system message the first turn must be the user's")
        turns[0] = ("user", system + turns[0][1])
    for i in range(1, len(turns)):
        if turns[i][0] == turns[i - 1][0]:
            raise ChatTemplateError("roles must alternate between user and assistant")
    text = "<bos>" + "".join(f"<start_of_turn>{r}\n{c.strip()}<end_of_turn>\n" for r, c in turns)
    if add_generation_prompt:
        text += "<start_of_turn>model\n"
    return text


def _control_pattern(control: list[str]):
    if not control:
        return None
    if all(p.startswith("<") and p.endswith(">") and "<" not in p[1:] for p in control):
        return re.compile(r"<[^<>]*>")  # candidates; membership is checked per match
    return re.compile("|".join(re.escape(p) for p in sorted(control, key=len, reverse=True)))


def _kept_pattern(kept: list[str]):
    """The pieces to cut out of the text before BPE, leftmost and longest first.

    Pieces shaped "<...>" (Gemma 4 has thousands: <unused0>...) are found through one
    candidate pattern and a dictionary lookup, since a regex alternation of thousands of
    literals is slow to compile and to scan; the others (whitespace runs) are spelled out.
    """
    if not kept:
        return None
    angle = [
        p for p in kept if len(p) > 2 and p[0] == "<" and p[-1] == ">" and not re.search("[<>]", p[1:-1])
    ]
    spelled = sorted(set(kept) - set(angle), key=len, reverse=True)
    alternatives = [re.escape(p) for p in spelled] + (["<[^<>]*>"] if angle else [])
    return re.compile("|".join(alternatives))


def _bpe_backend(pieces: list[str], types: list[int], merges: list[str], source: str):
    """A `tokenizers.Tokenizer` that tokenizes as llama.cpp does a "gemma4" vocabulary."""
    import tokenizers
    from tokenizers import decoders, normalizers, pre_tokenizers

    vocab = {p: i for i, p in enumerate(pieces)}
    pairs = []
    for m in merges:
        # llama.cpp splits a merge at the first space after its first byte (a piece may be " ").
        cut = m.find(" ", 1)
        if cut < 0:
            raise ModelFileError(f"{source}: merge {m!r} is not two pieces")
        pairs.append((m[:cut], m[cut + 1 :]))
    try:
        # No unknown token: llama.cpp drops a character that has neither a token nor byte tokens.
        model = tokenizers.models.BPE(vocab, pairs, byte_fallback=True, fuse_unk=False, ignore_merges=False)
    except Exception as e:  # tokenizers raises a bare Exception on inconsistent merges
        raise ModelFileError(f"{source}: invalid gemma4 vocabulary ({e})") from None
    backend = tokenizers.Tokenizer(model)
    backend.normalizer = normalizers.Replace(" ", SPACE)
    # llama.cpp's regex "[^\n]+|[\n]+": newline runs apart from the text around them.
    backend.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"\n+"), behavior="isolated")
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # Matched in the raw text before anything else, as llama.cpp's special-token partition does
    # (control and unknown tokens as specials, user-defined ones as plain text pieces).
    added = []
    for p, t in zip(pieces, types):
        if t in (CONTROL, UNKNOWN, USER_DEFINED) and p:
            added.append(tokenizers.AddedToken(p, special=t != USER_DEFINED, normalized=False))
    backend.add_tokens(added)
    return backend


_TOKENS, _SCORES, _TOKEN_TYPES = "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"


def _gguf_vocabulary(metadata) -> tuple[list[str], list[int]]:
    return list(metadata[_TOKENS]), [int(t) for t in metadata[_TOKEN_TYPES]]


def _cached_sentencepiece(folder, metadata):
    """The cached SentencePiece model of this vocabulary, or None (no entry, or one that does
    not load or does not have the file's token count: it is rebuilt and rewritten)."""
    proto = tokenizer_cache.read_model(folder)
    if proto is None:
        return None
    try:
        sp = _load_sentencepiece(proto, str(folder))
    except ModelFileError:
        return None
    return sp if sp.GetPieceSize() == metadata.array_length(_TOKENS) else None


class _SentencePieces(Sequence):
    """A GGUF vocabulary's pieces read from its SentencePiece model one at a time, for what
    needs a few of them (the chat template's special tokens, the named ids) before or without
    the whole list. A user-defined piece gets its spaces back (the model holds them escaped,
    as `from_gguf_metadata` builds it)."""

    def __init__(self, sp, types, metadata):
        self._sp, self._types, self._metadata = sp, types, metadata

    def __len__(self) -> int:
        return len(self._types)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i) + (len(self) if i < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"token id {i} out of range")
        piece = self._sp.IdToPiece(i)
        return piece.replace(SPACE, " ") if self._types[i] == USER_DEFINED else piece

    def find(self, piece: str) -> int | None:
        """The id of `piece`, or None. From the model for a piece without spaces or "▁" (its
        escaped form is itself); the others are searched in the file's decoded pieces."""
        if " " in piece or SPACE in piece:
            tokens = self._metadata[_TOKENS]
            return tokens.index(piece) if piece in tokens else None
        i = self._sp.PieceToId(piece)
        return i if self._sp.IdToPiece(i) == piece else None

    def __contains__(self, piece) -> bool:
        return isinstance(piece, str) and self.find(piece) is not None


def _sentencepiece_proto(pieces, scores, types) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    has_unknown = UNKNOWN in types
    for piece, score, kind in zip(pieces, scores, types):
        p = m.pieces.add()
        p.piece, p.score = piece, score
        # SentencePiece needs exactly one UNKNOWN piece; some GGUFs mark <unk> as control.
        p.type = UNKNOWN if (not has_unknown and piece == "<unk>") else kind
    ids = {p: i for i, p in enumerate(pieces)}
    spec = m.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.byte_fallback = BYTE in types
    spec.unk_id = ids.get("<unk>", 3)
    spec.bos_id, spec.eos_id, spec.pad_id = ids.get("<bos>", -1), ids.get("<eos>", -1), ids.get("<pad>", -1)
    norm = m.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = False
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return m.SerializeToString()


def _load_sentencepiece(proto: bytes, source: str):
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError) as e:
        raise ModelFileError(f"{source}: not a valid SentencePiece model ({e})") from None


def gguf_tokenizer(
    metadata, source: str, vocab_size: int, config_eos, in_place: bool = False
) -> tuple[Tokenizer, tuple[int, ...]]:
    """A GGUF's tokenizer and stop ids as a GGUF read in its own block types has them (no
    generation config beside the file): `loading` and the torch-free path alike. A vocabulary
    larger than the model's `vocab_size` is a ModelFileError."""
    tokenizer = Tokenizer.from_gguf_metadata(metadata, source, in_place=in_place)
    if tokenizer.vocab_size > vocab_size:
        raise ModelFileError(
            f"{source}: tokenizer has {tokenizer.vocab_size} tokens, model only {vocab_size}"
        )
    return tokenizer, generation_stop_ids(tokenizer, {}, config_eos)


def generation_stop_ids(tokenizer: Tokenizer, generation_config: dict, config_eos) -> tuple[int, ...]:
    """Stop ids: the generation config's eos list when given, plus the tokenizer's stop ids."""
    eos = generation_config.get("eos_token_id", list(config_eos))
    eos = eos if isinstance(eos, list) else [eos]
    return tuple(dict.fromkeys([*eos, *tokenizer.stop_ids]))
