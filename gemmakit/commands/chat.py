"""`gemmakit chat`: an interactive, streaming chat REPL over Gemma's chat template."""

from __future__ import annotations

import sys

from gemmakit.commands.common import add_model_arguments, load_llm

HELP = "commands: /reset clears the history, /system TEXT sets a system prompt, /exit quits"


def add_arguments(p):
    add_model_arguments(p)
    p.add_argument(
        "--system",
        default=None,
        help="system prompt, rendered by the model's chat template (Gemma 3's folds it into the first user turn; Gemma 4 has a system turn)",
    )
    p.add_argument("--max-new-tokens", type=int, default=512, help="reply length limit (512)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 means greedy (0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (0.95)")
    p.add_argument("--top-k", type=int, default=64, help="top-k filter; 0 disables (64)")
    p.add_argument("--seed", type=int, default=None, help="makes the replies reproducible")


def _fit_context(tok, system: str | None, history: list[dict], context: int) -> tuple[list[dict], list[int]]:
    """Drops the oldest exchanges until the conversation leaves room for a reply.

    Returns the kept history and the conversation's token ids. The last user turn is always
    kept; when it alone is too long, generating reports the error.
    """
    from gemmakit.errors import ContextLengthError
    from gemmakit.inference.engine import check_length

    while True:
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids = tok.encode(tok.apply_chat_template(messages))
        if len(history) <= 2:
            return history, ids
        try:
            check_length(len(ids), None, context, "conversation")
            return history, ids
        except ContextLengthError:
            history = history[2:]


def run(args) -> int:
    import dataclasses

    from gemmakit import SamplingParams

    # Built before loading, so a bad flag is refused before the model is read.
    base = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_tokens=args.max_new_tokens, seed=args.seed,
    )  # fmt: skip
    llm = load_llm(args)
    tok = llm.tokenizer
    interactive = sys.stdin.isatty()
    system, history = args.system, []
    if interactive:
        print(f"gemmakit chat with {llm.loaded.source.name}. {HELP}")
    seed = args.seed
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = []
            print("(history cleared)")
            continue
        if line.startswith("/system"):
            system = line.removeprefix("/system").strip() or None
            history = []
            print("(system prompt set; history cleared)")
            continue
        if line.startswith("/"):
            print(HELP)
            continue
        history.append({"role": "user", "content": line})
        history, ids = _fit_context(tok, system, history, llm.model.config.max_position_embeddings)
        params = dataclasses.replace(base, seed=seed)
        # Each reply its own seed; wrapped so that a seed at the 64-bit limit stays valid.
        seed = None if seed is None else (seed + 1) % 2**64
        reply = []
        for event in llm.stream([ids], params):
            reply.append(event.delta)
            sys.stdout.write(event.delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0
