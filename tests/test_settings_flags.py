"""Every flag of `tinygpt train|sample|bench` refuses what its setting's rule forbids (nan, ±inf, a value out
of range, an unknown choice): one line on stderr, exit 2, nothing written. The cases are derived from the
settings dataclasses' fields, so a field added later is covered without a new test."""
import math
import typing
from dataclasses import fields

import pytest

from tinygpt.bench import BenchSettings
from tinygpt.cli import build_parser, main
from tinygpt.settings import OneOf, Range, RunSettings, SampleSettings

COMMANDS = {"train": RunSettings, "sample": SampleSettings, "bench": BenchSettings}


def kind(cls, f):
    """int, float, bool or str: the field's annotation without `| None`."""
    hint = typing.get_type_hints(cls)[f.name]
    return next(a for a in (typing.get_args(hint) or (hint,)) if a is not type(None))


def flag_fields():
    """(command, field, kind) for every field that is a value-taking flag."""
    return [(cmd, f, kind(cls, f)) for cmd, cls in COMMANDS.items() for f in fields(cls)
            if f.metadata["flag"] and not f.metadata.get("switch")]


def flag(f):
    return "--" + f.name.replace("_", "-")


def ident(case):
    return f"{case[0]}{flag(case[1])}"


def outside(rule, k):
    """Values just outside a Range (its open ends included), as the flag would read them."""
    step = 1 if k is int else 1e-3
    out = []
    if rule.lo is not None:
        out.append(rule.lo if rule.lo_open else rule.lo - step)
    if rule.hi is not None:
        out.append(rule.hi if rule.hi_open else rule.hi + step)
    return [k(v) for v in out]


def inside(rule, k):
    """Values at the allowed edges of a Range."""
    step = 1 if k is int else 1e-3
    out = []
    if rule.lo is not None:
        out.append(rule.lo + step if rule.lo_open else rule.lo)
    if rule.hi is not None:
        out.append(rule.hi - step if rule.hi_open else rule.hi)
    return [k(v) for v in out]


FLOATS = [c for c in flag_fields() if c[2] is float]
RANGES = [(cmd, f, k, v) for cmd, f, k in flag_fields() if isinstance(f.metadata["rule"], Range)
          for v in outside(f.metadata["rule"], k)]
CHOICES = [c for c in flag_fields() if isinstance(c[1].metadata["rule"], OneOf)]


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))


def refused(capsys, tmp_path, argv, *names):
    """main(argv) exits 2 with one line on stderr that names each of `names`, and writes no file."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinygpt") and "Traceback" not in err, err
    assert all(n in lines[0] for n in names), lines[0]
    assert list(tmp_path.iterdir()) == [], "bad input must not write anything"


def test_the_cases_cover_the_known_flags():
    """The derivation finds the flags the issue names (it must not come back empty)."""
    names = {(cmd, flag(f)) for cmd, f, _ in FLOATS}
    assert {("train", "--lr"), ("train", "--min-lr"), ("train", "--weight-decay"), ("train", "--grad-clip"),
            ("train", "--dropout"), ("train", "--beta1"), ("train", "--beta2"), ("sample", "--temperature"),
            ("sample", "--top-p")} <= names
    assert ("bench", "--memory-trace") in {(cmd, flag(f)) for cmd, f, _, _ in RANGES}


def test_every_value_flag_is_a_checked_setting():
    """No flag bypasses the dataclasses: each value-taking flag of a command is one of its fields."""
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for cmd, cls in COMMANDS.items():
        flags = {o for a in sub[cmd]._actions if a.nargs != 0 and a.option_strings and a.dest != "_child"
                 for o in a.option_strings}
        assert flags == {flag(f) for c, f, _ in flag_fields() if c == cmd}, cmd


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999"])
@pytest.mark.parametrize("case", FLOATS, ids=ident)
def test_float_flags_refuse_non_finite_values(case, value, capsys, tmp_path):
    cmd, f, _ = case
    refused(capsys, tmp_path, [cmd, f"{flag(f)}={value}"], flag(f), "finite")


@pytest.mark.parametrize("case", RANGES, ids=lambda c: f"{c[0]}{flag(c[1])}={c[3]}")
def test_number_flags_refuse_values_out_of_range(case, capsys, tmp_path):
    cmd, f, _, value = case
    refused(capsys, tmp_path, [cmd, f"{flag(f)}={value}"], flag(f), f.metadata["rule"].describe())


@pytest.mark.parametrize("case", CHOICES, ids=ident)
def test_choice_flags_refuse_unknown_names(case, capsys, tmp_path):
    cmd, f, _ = case
    refused(capsys, tmp_path, [cmd, f"{flag(f)}=gpt5"], flag(f), "gpt5", ", ".join(f.metadata["rule"].choices))


@pytest.mark.parametrize("case", [c for c in flag_fields() if c[2] in (int, float)], ids=ident)
def test_number_flags_accept_the_edges_of_their_range(case):
    """The rules are not stricter than they say: the allowed edges parse to themselves."""
    cmd, f, k = case
    rule = f.metadata["rule"] or Range()
    for value in inside(rule, k) or [k(1)]:
        args = build_parser().parse_args([cmd, f"{flag(f)}={value}"])
        assert getattr(args, f.name) == value


def test_bench_memory_trace_negative_is_one_line(capsys, tmp_path):
    """It used to end in a StopIteration traceback."""
    refused(capsys, tmp_path, ["bench", "--memory-trace", "-3"], "--memory-trace", ">= 0")
    refused(capsys, tmp_path, ["bench", "--steps", "0"], "--steps")
    refused(capsys, tmp_path, ["bench", "--workers", "0"], "--workers")


def test_cross_field_rule_on_the_command_line(capsys, tmp_path):
    refused(capsys, tmp_path, ["train", "--lr", "1e-3", "--min-lr", "1e-2"], "min_lr")
    refused(capsys, tmp_path, ["train", "--warmup-iters", "50", "--lr-decay-iters", "10"], "warmup_iters=50")


def test_bool_flags_read_true_and_false_only(capsys, tmp_path):
    args = build_parser().parse_args(["train", "--bias", "yes", "--tie-weights", "0"])
    assert args.bias is True and args.tie_weights is False
    refused(capsys, tmp_path, ["train", "--bias", "maybe"], "--bias", "true or false")


def test_a_flag_left_out_takes_the_preset_value():
    args = build_parser().parse_args(["train"])
    assert all(getattr(args, f.name) is None for f in fields(RunSettings) if f.metadata["flag"])
    assert math.isclose(build_parser().parse_args(["sample"]).temperature, 1.0)
