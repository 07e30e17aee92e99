"""`gemmakit cache list|clear`: what the model caches hold, and emptying them.

The caches (`paths.CACHE_KINDS`) keep GGUFs dequantized to float32, quantized models and the
tokenizers built from GGUF vocabularies, so a second load takes milliseconds; they are bounded by `$GEMMAKIT_CACHE_MAX_BYTES` (least
recently used entries go first), and `clear` empties them at once.
"""

from __future__ import annotations

from gemmakit.commands.common import print_json
from gemmakit.paths import CACHE_KINDS


def add_arguments(p):
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="entries, sizes and last use, least recently used first")
    ls.add_argument("--json", action="store_true", help="print the entries as JSON")
    clear = sub.add_parser("clear", help="remove every entry (the bundled model stays)")
    clear.add_argument("--kind", choices=CACHE_KINDS, default=None, help="only this cache")


def _source(entry) -> str | None:
    import json

    from gemmakit.paths import SOURCE_FILE

    try:
        return json.loads((entry.path / SOURCE_FILE).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def _size(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _count(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def run(args) -> int:
    from gemmakit.paths import age, cache_dir, cache_entries, cache_limit, clear_cache

    if args.action == "clear":
        removed = clear_cache((args.kind,) if args.kind else CACHE_KINDS)
        print(f"removed {_count(len(removed))}, {_size(sum(e.bytes for e in removed))} from {cache_dir()}")
        return 0
    entries, limit = cache_entries(), cache_limit()
    total = sum(e.bytes for e in entries)
    if args.json:
        rows = [
            {
                "path": str(e.path),
                "kind": e.kind,
                "bytes": e.bytes,
                "last_used": e.last_used,
                "source": _source(e),
            }
            for e in entries
        ]
        print_json({"cache_dir": str(cache_dir()), "bytes": total, "limit_bytes": limit, "entries": rows})
        return 0
    print(
        f"{cache_dir()}: {_count(len(entries))}, {_size(total)} of {_size(limit)} (GEMMAKIT_CACHE_MAX_BYTES)"
    )
    for e in entries:
        print(
            f"  {e.kind:<10}  {_size(e.bytes):>9}  used {age(e.last_used):<12}  {e.path.name}  {_source(e) or ''}"
        )
    return 0
