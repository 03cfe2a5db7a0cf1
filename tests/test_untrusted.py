"""The shared trust-boundary checks: reproductions of real attacks, then fuzzing."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tplr.untrusted import (
    MalformedInput,
    bracket_depth_numpy,
    bracket_depth_python,
    check_key,
    check_prefix,
    finite_float,
    json_depth,
    load_json,
    open_no_follow,
    parse_ascii_int,
    resolve_under,
)


@pytest.mark.parametrize("text", ["²", "١٢", "٣", "12a", "", "-1", "+1", " 1", "1.0", "1" * 20])
def test_ascii_int_refuses_what_isdigit_or_int_would_take(text):
    with pytest.raises(MalformedInput, match="window"):
        parse_ascii_int(text, what="window")


def test_ascii_int_bounds_and_types():
    assert parse_ascii_int("0042", what="n") == 42
    with pytest.raises(MalformedInput, match=r"outside \[0, 9\]"):
        parse_ascii_int("10", what="n", max_value=9)
    with pytest.raises(MalformedInput, match="int"):
        parse_ascii_int(7, what="n")


@pytest.mark.parametrize("value", [True, None, "1", float("nan"), float("inf"), 10**400, [1]])
def test_finite_float_refuses(value):
    with pytest.raises(MalformedInput, match="genesis"):
        finite_float(value, what="genesis")


def test_finite_float_bounds():
    assert finite_float(3, what="x", min_value=1) == 3.0
    with pytest.raises(MalformedInput, match="below the minimum 1"):
        finite_float(1e-300, what="window_seconds", min_value=1)


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (b"[" * 5000 + b"]" * 5000, "nests 5000 levels"),
        (b'{"a": NaN}', "NaN"),
        (b'{"a": Infinity}', "Infinity"),
        (b'{"a": 1e400}', "finite float"),
        (b'{"a": 1, "a": 2}', "repeats the key 'a'"),
        (b"\xff\xfe", "not UTF-8"),
        (b'{"a": ' + b"1" * 5000 + b"}", "not valid JSON"),
        (b'{"a": [1, 2', "not valid JSON"),
        (b" " * 20_000, "limit is 16384"),
    ],
)
def test_load_json_refuses_hostile_documents(document, problem):
    with pytest.raises(MalformedInput, match=problem):
        load_json(document, what="manifest", max_bytes=16_384)


def test_load_json_depth_ignores_brackets_in_strings():
    document = json.dumps({"a": "[[[[[[[[[[" * 10, "b": [[1]]}).encode()
    assert json_depth(document) == 3
    assert load_json(document, what="x", max_bytes=10_000, max_depth=3)["b"] == [[1]]


@pytest.mark.parametrize(
    "key",
    ["/etc/passwd", "../.env", "a/../../b", "a//b", "a/./b", "./a", "a/", "a\\b", "a\x00b", "a\nb"],
)
def test_check_key_refuses_escapes(key):
    with pytest.raises(MalformedInput, match="keys must be relative"):
        check_key(key)


def test_check_prefix():
    assert check_prefix("") == ""
    assert check_prefix("remote/tokenized/") == "remote/tokenized/"
    for bad in ("remote", "../x/", "/abs/"):
        with pytest.raises(MalformedInput):
            check_prefix(bad)


def test_resolve_under_catches_symlinked_escape(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    assert resolve_under(root, "a/b.bin") == (root / "a" / "b.bin").resolve()
    with pytest.raises(MalformedInput, match="resolves outside"):
        resolve_under(root, "link/x.bin")


def test_open_no_follow_refuses_a_symlink(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"secret")
    link = tmp_path / "dest.partial"
    link.symlink_to(target)
    with pytest.raises(OSError):
        open_no_follow(link, os.O_RDWR)
    assert target.read_bytes() == b"secret"


# -- fuzzing: only MalformedInput, never anything else ------------------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=30,
)


@given(st.binary(max_size=512))
def test_load_json_fuzz_bytes(data):
    try:
        load_json(data, what="fuzz", max_bytes=256, max_depth=8)
    except MalformedInput:
        pass


@given(json_values)
def test_load_json_round_trips_valid_documents(value):
    text = json.dumps(value)
    depth = json_depth(text.encode())
    assert load_json(text, what="fuzz", max_bytes=1 << 20, max_depth=max(depth, 1)) == value


@given(st.lists(st.sampled_from(b"[]{}"), max_size=200).map(bytes))
def test_json_depth_counts_alike_in_python_and_numpy(brackets):
    assert bracket_depth_python(brackets) == bracket_depth_numpy(brackets)


@given(st.text(max_size=64))
def test_check_key_fuzz(key):
    try:
        checked = check_key(key)
    except MalformedInput:
        return
    segments = checked.split("/")
    assert not checked.startswith("/") and "\\" not in checked
    assert all(segment not in ("", ".", "..") for segment in segments)


@given(st.text(max_size=32))
def test_resolve_under_never_leaves_root(tmp_path_factory, key):
    root = tmp_path_factory.getbasetemp() / "fuzz-root"
    root.mkdir(exist_ok=True)
    try:
        path = resolve_under(root, key)
    except MalformedInput:
        return
    assert path.is_relative_to(root.resolve())


@given(st.text(max_size=24) | st.integers() | st.none())
def test_parse_ascii_int_fuzz(text):
    try:
        value = parse_ascii_int(text, what="n")
    except MalformedInput:
        return
    assert isinstance(text, str) and text.isascii() and value == int(text)
