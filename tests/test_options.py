"""gemmakit.options: dataclass fields declared with `option` become argparse flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from gemmakit.options import add_options, flag_fields, help_texts, option


@dataclass
class Served:
    """Shaped like the server's settings: explicit metavars, optional ints, a Python-only field."""

    host: str = option("127.0.0.1", "address to bind (127.0.0.1)", metavar="ADDR")
    port: int = option(8000, "port (8000)", metavar="N")
    max_model_len: int | None = option(None, "context length served", metavar="N")
    window_s: float = option(0.01, "batching window", cli=False)


@dataclass
class Tuned:
    """Shaped like the training settings: bools, tuples, aliases, choices, a `%` in the help."""

    model: str | None = option(None, "model folder", aliases=("-m",))
    recipe: str = option("a", "preset", choices=("a", "b", "old-a"), metavar="{a,b}")
    lr: float = option(2e-5, "peak learning rate")
    targets: tuple[str, ...] = option(("q", "v"), "modules, comma-separated")
    packing: bool = option(False, "pack rows (~30% fewer pads)")
    autocast: bool | None = option(None, "autocast")


def parser_for(cls, **kw) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="x")
    add_options(p.add_argument_group("g"), cls, **kw)
    return p


def test_server_shaped_fields_keep_their_defaults_types_and_metavars():
    p = parser_for(Served, show_defaults=False)
    args = p.parse_args([])
    assert (args.host, args.port, args.max_model_len) == ("127.0.0.1", 8000, None)
    assert not hasattr(args, "window_s")  # cli=False: no flag
    args = p.parse_args(["--port", "9", "--max-model-len", "128"])
    assert (args.port, args.max_model_len) == (9, 128)
    text = p.format_help()
    assert "--host ADDR" in text and "--port N" in text and "port (8000)" in text and "(default:" not in text
    assert [f.name for f in flag_fields(Served)] == ["host", "port", "max_model_len"]
    with pytest.raises(SystemExit):
        p.parse_args(["--port", "x"])


def test_training_shaped_fields_parse_and_show_defaults(capsys):
    p = parser_for(Tuned, unset_default=True)
    assert all(v is None for v in vars(p.parse_args([])).values())  # absent flags are unset
    args = p.parse_args(["-m", "m", "--recipe", "old-a", "--lr", "0.5", "--targets", "q, k,", "--packing"])
    assert (args.model, args.recipe, args.lr, args.targets, args.packing) == (
        "m",
        "old-a",
        0.5,
        ("q", "k"),
        True,
    )
    assert p.parse_args(["--no-autocast"]).autocast is False
    with pytest.raises(SystemExit):
        p.parse_args(["--recipe", "c"])
    text = p.format_help()
    assert "--recipe {a,b}" in text and "(default: q,v)" in text and "~30% fewer pads" in text
    assert "(default: 2e-05)" in text and "--packing, --no-packing" in text
    assert help_texts(Tuned)["lr"] == "peak learning rate"


def test_names_select_and_order_the_flags():
    p = argparse.ArgumentParser(prog="x")
    added = add_options(p, Tuned, ("lr", "model"))
    assert added == ["lr", "model"]
    assert vars(p.parse_args([])) == {"lr": 2e-5, "model": None}


def test_a_help_that_states_its_default_gets_no_second_one():
    @dataclass
    class Device:
        device: str | None = option(None, "cpu or cuda (default: cuda if present)")

    text = " ".join(parser_for(Device).format_help().split())
    assert "(default: cuda if present)" in text and "(default: None)" not in text
