"""The trust boundary's shared checks, for bytes that come from outside the node.

Peers, their buckets and endpoints, the dataset bucket's listing and manifest, and files a
local user can swap (partials, journals, symlinks) are all hostile by assumption (see
``docs/security.md``). Every parser of such data calls these checks *before* it uses a
value, and they raise only :class:`MalformedInput`, which callers turn into their own typed
error (``PayloadRejected``, ``ManifestError``, ...) with the context they know.

- :func:`parse_ascii_int`: ASCII digits only (``"²"`` passes ``str.isdigit``), bounded.
- :func:`finite_float`: a real, finite number within bounds (no ``bool``, NaN or inf).
- :func:`load_json`: size-bounded, strict UTF-8, nesting-depth-bounded JSON without
  ``NaN``/``Infinity`` constants, out-of-range floats or duplicate keys.
- :func:`check_key` / :func:`resolve_under`: a relative ``/``-separated key without empty,
  ``.`` or ``..`` segments, backslashes, NUL or control characters; a path that, resolved
  through any symlinks, stays under its root.
- :func:`open_no_follow`: ``os.open`` that refuses a symlink as the last component.
- :func:`load_model`: :func:`load_json`, then a strict pydantic model; the first problem named
  by its field path.

Nothing here does I/O except :func:`resolve_under` (``Path.resolve``) and
:func:`open_no_follow`; call those from a worker thread when on the event loop.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from tplr.errors import TplrError

ModelT = TypeVar("ModelT", bound=BaseModel)

MAX_KEY_BYTES = 1024
DEFAULT_MAX_JSON_DEPTH = 32
_ASCII_INT = re.compile(r"[0-9]{1,19}")
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPENERS = b"[{"
_NOT_BRACKETS = bytes(code for code in range(256) if code not in b"[]{}")
_PYTHON_BRACKETS = 1 << 16  # below this, a Python loop beats importing numpy


class MalformedInput(TplrError):
    """Data from outside the node failed a boundary check (the message says which)."""

    hint = "the data came from outside this node; it is refused and nothing was used"


def parse_ascii_int(
    text: object, *, what: str, min_value: int = 0, max_value: int = (1 << 63) - 1
) -> int:
    """``text`` as a non-negative decimal of ASCII digits in ``[min_value, max_value]``."""
    if not isinstance(text, str) or not _ASCII_INT.fullmatch(text):
        shown = text[:40] if isinstance(text, str) else type(text).__name__
        raise MalformedInput(f"{what}={shown!r} is not a decimal number of ASCII digits")
    value = int(text)
    if not min_value <= value <= max_value:
        raise MalformedInput(f"{what}={value} is outside [{min_value}, {max_value}]")
    return value


def finite_float(
    value: object,
    *,
    what: str,
    min_value: float | None = None,
    max_value: float | None = None,
) -> float:
    """``value`` (an int or float, not a bool) as a finite float within the bounds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedInput(f"{what} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise MalformedInput(f"{what} is too large to be a float") from None
    if not math.isfinite(number):
        raise MalformedInput(f"{what} must be finite, got {number}")
    if min_value is not None and number < min_value:
        raise MalformedInput(f"{what}={number} is below the minimum {min_value}")
    if max_value is not None and number > max_value:
        raise MalformedInput(f"{what}={number} is above the maximum {max_value}")
    return number


def json_depth(data: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in JSON text ``data`` (strings are skipped).

    Linear time, no recursion: hostile input cannot exhaust the stack here. A few
    brackets (every manifest, run spec and journal) are counted in Python; many are
    counted with numpy, imported only then (``tplr fetch`` starts without it).
    """
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if len(brackets) <= _PYTHON_BRACKETS:
        return bracket_depth_python(brackets)
    return bracket_depth_numpy(brackets)


def bracket_depth_python(brackets: bytes) -> int:
    depth = deepest = 0
    for code in brackets:
        depth += 1 if code in _OPENERS else -1
        deepest = max(deepest, depth)
    return deepest


def bracket_depth_numpy(brackets: bytes) -> int:
    import numpy as np

    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.isin(codes, np.frombuffer(_OPENERS, np.uint8)).astype(np.int64) * 2 - 1
    return int(max(np.cumsum(steps).max(), 0))


def _reject_constant(name: str) -> Any:
    raise MalformedInput(f"JSON constant {name} is not allowed (numbers must be finite)")


def _finite_json_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise MalformedInput(f"JSON number {text[:40]} does not fit a finite float")
    return number


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise MalformedInput(f"JSON object repeats the key {duplicate[:80]!r}")
    return document


def load_json(
    data: bytes | str,
    *,
    what: str,
    max_bytes: int,
    max_depth: int = DEFAULT_MAX_JSON_DEPTH,
) -> Any:
    """Parse untrusted JSON: at most ``max_bytes``, UTF-8, at most ``max_depth`` deep,
    finite numbers only, no duplicate keys. Raises :class:`MalformedInput` naming ``what``."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise MalformedInput(f"{what} is {len(raw)} bytes, the limit is {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedInput(
            f"{what} is not UTF-8 text: {exc.reason} at byte {exc.start}"
        ) from None
    depth = json_depth(raw)
    if depth > max_depth:
        raise MalformedInput(f"{what} nests {depth} levels deep, the limit is {max_depth}")
    try:
        return json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_json_float,
            object_pairs_hook=_unique_keys,
        )
    except MalformedInput as exc:
        raise MalformedInput(f"{what}: {exc.message}") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge int literals
        raise MalformedInput(f"{what} is not valid JSON: {str(exc)[:200]}") from None


def check_key(key: object, *, what: str = "key", allow_empty: bool = False) -> str:
    """``key`` if it is a safe relative ``/``-separated object key, else MalformedInput.

    Refused: non-strings, more than :data:`MAX_KEY_BYTES`, NUL, backslashes, control
    characters, a leading ``/``, and empty, ``.`` or ``..`` segments (a trailing ``/`` is an
    empty segment). ``allow_empty`` admits ``""`` (a whole-bucket prefix).
    """
    if not isinstance(key, str):
        raise MalformedInput(f"{what} must be a string, got {type(key).__name__}")
    if key == "" and allow_empty:
        return key
    problem = None
    if not key:
        problem = "is empty"
    elif len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        problem = f"is longer than {MAX_KEY_BYTES} bytes"
    elif any(ord(char) < 0x20 or ord(char) == 0x7F for char in key):
        problem = "contains a NUL or control character"
    elif "\\" in key:
        problem = "contains a backslash"
    elif key.startswith("/"):
        problem = "is absolute"
    elif any(segment in ("", ".", "..") for segment in key.split("/")):
        problem = "has an empty, '.' or '..' segment"
    if problem is not None:
        raise MalformedInput(f"{what} {key[:120]!r} {problem}; keys must be relative paths")
    return key


def check_prefix(prefix: object, *, what: str = "prefix") -> str:
    """A key prefix: ``""`` or a safe key ending in ``/``."""
    if prefix == "":
        return ""
    if not isinstance(prefix, str) or not prefix.endswith("/"):
        raise MalformedInput(f"{what} {str(prefix)[:120]!r} must be empty or end with '/'")
    check_key(prefix[:-1], what=what)
    return prefix


def resolve_under(root: Path, key: str, *, what: str = "key") -> Path:
    """``root / key`` resolved (through symlinks); MalformedInput if it leaves ``root``."""
    check_key(key, what=what)
    base = Path(root).resolve()
    path = (base / key).resolve()
    if path == base or not path.is_relative_to(base):
        raise MalformedInput(f"{what} {key[:120]!r} resolves outside {base}")
    return path


def open_no_follow(path: Path | str, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that fails (``OSError`` ELOOP) when ``path`` itself is a symlink."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def load_model(
    data: bytes | str,
    model: type[ModelT],
    *,
    what: str,
    max_bytes: int,
    max_depth: int = DEFAULT_MAX_JSON_DEPTH,
) -> ModelT:
    """Untrusted JSON as a validated ``model``; :class:`MalformedInput` naming ``what`` and
    the first offending field otherwise."""
    document = load_json(data, what=what, max_bytes=max_bytes, max_depth=max_depth)
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "(document)"
        raise MalformedInput(f"{what}: {where}: {error['msg']}") from None
