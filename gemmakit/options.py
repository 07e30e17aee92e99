"""Command-line flags from dataclass fields, so a settings class and its CLI cannot drift apart.

A field declared with `option(default, help, ...)` carries its help text, metavar, extra flag
names and choices in the field's metadata; `add_options(group, cls)` adds one flag per field to
an argparse group, typed from the field's annotation:

    @dataclass
    class Settings:
        port: int = option(8000, "port to listen on", metavar="N")
        verbose: bool = option(False, "print every request")
        # Not a flag: set from Python only.
        window_s: float = option(0.01, "batching window", cli=False)

    add_options(parser.add_argument_group("server"), Settings)   # --port N, --verbose/--no-verbose

A leaf module: standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable


def option(
    default=dataclasses.MISSING,
    help: str = "",
    *,
    metavar: str | None = None,
    aliases: tuple[str, ...] = (),
    choices: Iterable | None = None,
    cli: bool = True,
):
    """A dataclass field that describes its own command-line flag.

    Args:
        default: the field's default value.
        help: the flag's help text (argparse's `%` needs no escaping here).
        metavar: the value's placeholder in the help (default: the name's last word, upper-cased).
        aliases: further flag names, e.g. ("-m",).
        choices: the accepted values, checked by argparse.
        cli: False for a field that is set from Python only and gets no flag.
    """
    metadata = {"help": help, "metavar": metavar, "aliases": tuple(aliases), "cli": cli}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=metadata)


def flag_fields(cls) -> list[dataclasses.Field]:
    """The fields of dataclass `cls` that are flags (all but those marked `cli=False`)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def flag_name(name: str) -> str:
    """`max_steps` -> `--max-steps`."""
    return "--" + name.replace("_", "-")


def help_texts(cls) -> dict[str, str]:
    """{field name: help text} of the fields of `cls` that have one."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls) if f.metadata.get("help")}


def value_type(annotation) -> type:
    """The type a flag's text is converted to: `int | None` -> int, `tuple[str, ...]` -> tuple."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(kinds) != 1:
            raise TypeError(f"a flag needs one value type, not {annotation}")
        annotation = kinds[0]
    return typing.get_origin(annotation) or annotation


def comma_list(text: str) -> tuple[str, ...]:
    """`"q_proj, v_proj"` -> ("q_proj", "v_proj"): the value of a tuple-typed flag."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def default_of(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _help(f: dataclasses.Field, show_default: bool) -> str:
    text = f.metadata.get("help", "").replace("%", "%%")
    if not show_default or "default:" in text:  # a help text that explains its own default
        return text
    default = default_of(f)
    shown = ",".join(default) if isinstance(default, tuple) else default
    return f"{text} (default: {shown})" if text else f"default: {shown}"


def add_options(
    group, cls, names: Iterable[str] | None = None, *, unset_default: bool = False, show_defaults: bool = True
) -> list[str]:
    """Adds a flag for each field of dataclass `cls` (or for `names`, in that order) to `group`.

    bool fields become `--x/--no-x` pairs; other fields take one value converted to the type
    of their annotation (a tuple from comma-separated text).

    Args:
        group: an argparse parser or argument group.
        cls: the dataclass.
        names: the fields to add (default: every field not marked `cli=False`).
        unset_default: parse an absent flag as None instead of the field's default, so that the
            caller can tell which flags were given (to layer them over a file or a preset).
        show_defaults: append "(default: X)" to each help text.

    Returns:
        The names of the fields added.
    """
    by_name = {f.name: f for f in flag_fields(cls)}
    hints = typing.get_type_hints(cls)
    selected = list(by_name) if names is None else list(names)
    for name in selected:
        f = by_name[name]
        kind = value_type(hints[name])
        kw = {
            "dest": name,
            "default": None if unset_default else default_of(f),
            "help": _help(f, show_defaults),
        }
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = comma_list if kind is tuple else kind
            kw["metavar"] = f.metadata.get("metavar") or name.split("_")[-1].upper()
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        group.add_argument(flag_name(name), *f.metadata.get("aliases", ()), **kw)
    return selected
