"""User-supplied regexes, matched in time linear in the prompt: hostile patterns cannot hang us.

Python's `re` backtracks, so `(a+)+$` on a few dozen characters runs for ages while holding the
GIL, and it has no timeout. Patterns are therefore parsed with `re`'s own parser (so the syntax
and its error messages are exactly `re`'s), compiled to a Thompson NFA and searched by
simulating every thread at once, as RE2 does: each prompt character costs at most one step per
NFA state, whatever the pattern. Supported: literals, classes, `.`, `\\d \\w \\s`, groups,
alternation, `? * + {m,n}` (lazy or greedy, same answer for a yes/no search), `^ $ \\A \\Z \\b \\B`
and the flags `i m s x`. Refused with a clear message: backreferences, lookarounds,
conditionals, atomic groups, possessive repeats, scoped flags, `(?a)` and `(?L)`.

Bounds: patterns of at most MAX_PATTERN_CHARS, repeat counts up to MAX_REPEAT_COUNT, at most
MAX_STATES NFA states, and only the prompt's first SEARCH_CHARS characters are searched, so the
worst case of one search is SEARCH_CHARS x MAX_STATES steps. Steps are memoised as a lazy DFA
(state set, character, what follows) → next state set, so ordinary prompts cost one dict
lookup per character.
"""

from __future__ import annotations

import re
import re._constants as C  # type: ignore[import-not-found]  # no stubs for re internals
import re._parser as sre_parse  # type: ignore[import-not-found]  # what re.compile uses
import threading
from collections.abc import Callable
from typing import Any

MAX_PATTERN_CHARS = 256
MAX_REPEAT_COUNT = 100
MAX_STATES = 500
SEARCH_CHARS = 4096
MEMO_MAX = 50_000  # memoised steps per pattern before the memo starts over

Pred = Callable[[str], bool]
_ALLOWED_FLAGS = C.SRE_FLAG_IGNORECASE | C.SRE_FLAG_MULTILINE | C.SRE_FLAG_DOTALL
_ALLOWED_FLAGS |= C.SRE_FLAG_VERBOSE | C.SRE_FLAG_UNICODE

# What follows a position, as far as assertions care.
_END, _LAST_NL, _NL, _WORD, _OTHER = range(5)


class UnsafePattern(ValueError):
    """The pattern is invalid, too large, or uses syntax that cannot run in linear time."""


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES: dict[Any, Pred] = {
    C.CATEGORY_DIGIT: str.isdecimal,
    C.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    C.CATEGORY_SPACE: str.isspace,
    C.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    C.CATEGORY_WORD: _is_word,
    C.CATEGORY_NOT_WORD: lambda ch: not _is_word(ch),
}


class SafePattern:
    """A compiled pattern whose `search` is linear in the searched text."""

    def __init__(self, pattern: str) -> None:
        if len(pattern) > MAX_PATTERN_CHARS:
            raise UnsafePattern(f"pattern is over {MAX_PATTERN_CHARS} characters")
        try:
            re.compile(pattern)
            parsed = sre_parse.parse(pattern, 0)
        except (re.error, RecursionError, OverflowError) as exc:
            raise UnsafePattern(f"invalid regex: {exc}") from exc
        self.pattern = pattern
        self._flags = int(parsed.state.flags)
        if self._flags & ~_ALLOWED_FLAGS:
            raise UnsafePattern("only the flags i, m, s and x are supported")
        self._prog: list[list[Any]] = []
        self._preds: dict[int, Pred] = {}
        self._seq(parsed)
        self._add("match")
        self._lock = threading.Lock()
        self._memo: _Memo = _Memo()

    # Compilation: one instruction per list, ["char", pred] | ["split", a, b] | ["jmp", a]
    # | ["assert", kind] | ["match"]; jumps are patched once their target is known.

    def _add(self, *ins: Any) -> int:
        if len(self._prog) >= MAX_STATES:
            raise UnsafePattern(f"pattern expands to over {MAX_STATES} states; simplify it")
        self._prog.append(list(ins))
        return len(self._prog) - 1

    def _seq(self, items: Any) -> None:
        for op, av in items:
            self._node(op, av)

    def _node(self, op: Any, av: Any) -> None:
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY, C.IN):
            self._add("char", self._pred(op, av))
        elif op is C.BRANCH:
            self._branch(av[1])
        elif op is C.SUBPATTERN:
            if av[1] or av[2]:
                raise UnsafePattern("scoped flags (?i:…) are not supported; put flags first")
            self._seq(av[3])
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT):
            self._repeat(*av)
        elif op is C.AT:
            self._add("assert", av)
        else:
            name = str(op).lower()
            raise UnsafePattern(f"{name} is not supported (no backreferences or lookarounds)")

    def _branch(self, alternatives: list[Any]) -> None:
        exits = []
        for alt in alternatives[:-1]:
            split = self._add("split", len(self._prog) + 1, None)
            self._seq(alt)
            exits.append(self._add("jmp", None))
            self._prog[split][2] = len(self._prog)
        self._seq(alternatives[-1])
        for j in exits:
            self._prog[j][1] = len(self._prog)

    def _repeat(self, lo: int, hi: Any, body: Any) -> None:
        unbounded = hi is C.MAXREPEAT
        if lo > MAX_REPEAT_COUNT or (not unbounded and hi > MAX_REPEAT_COUNT):
            raise UnsafePattern(f"repeat counts are capped at {MAX_REPEAT_COUNT}")
        for _ in range(lo):
            self._seq(body)
        if unbounded:
            split = self._add("split", len(self._prog) + 1, None)
            self._seq(body)
            self._add("jmp", split)
            self._prog[split][2] = len(self._prog)
            return
        splits = []
        for _ in range(hi - lo):
            splits.append(self._add("split", len(self._prog) + 1, None))
            self._seq(body)
        for s in splits:
            self._prog[s][2] = len(self._prog)

    def _pred(self, op: Any, av: Any) -> Pred:
        if op is C.ANY:
            return (lambda ch: True) if self._flags & C.SRE_FLAG_DOTALL else (lambda ch: ch != "\n")
        if op in (C.LITERAL, C.NOT_LITERAL):
            inside, negate = _class_pred([(C.LITERAL, av)]), op is C.NOT_LITERAL
        else:
            negate = bool(av) and av[0][0] is C.NEGATE
            inside = _class_pred(av[1:] if negate else av)
        if self._flags & C.SRE_FLAG_IGNORECASE:
            exact = inside
            inside = lambda ch: exact(ch) or exact(ch.lower()) or exact(ch.upper())  # noqa: E731
        return (lambda ch: not inside(ch)) if negate else inside

    # Matching

    def search(self, text: str) -> bool:
        """True when the pattern matches anywhere in the text's first SEARCH_CHARS characters."""
        memo = self._memo
        sid, matched = self._intern(memo, self._closure({0}, None, _follows(text, 0)))
        n = min(len(text), SEARCH_CHARS)  # `$` and `\b` still see the character after a cut
        i = 0
        while not matched and i < n:
            ch = text[i]
            i += 1
            nxt = _follows(text, i)
            step = memo.steps.get((sid, ch, nxt))
            if step is None:
                if len(memo.steps) >= MEMO_MAX:  # RE2's answer: drop the memo, start over
                    states = memo.sets[sid]
                    memo = self._memo = _Memo()
                    sid, _ = self._intern(memo, (frozenset(states), False))
                step = self._step(memo, sid, ch, nxt)
            sid, matched = step
        return matched

    def _step(self, memo: _Memo, sid: int, ch: str, follows: int) -> tuple[int, bool]:
        moved = {pc + 1 for pc in memo.sets[sid] if self._prog[pc][1](ch)}
        moved.add(0)  # a search: a new attempt starts at every position
        result = self._intern(memo, self._closure(moved, ch, follows))
        memo.steps[(sid, ch, follows)] = result
        return result

    def _intern(self, memo: _Memo, closure: tuple[frozenset[int], bool]) -> tuple[int, bool]:
        states, matched = closure
        key = tuple(sorted(states))
        with self._lock:  # API threads share the memo; ids must stay unique
            sid = memo.ids.get(key)
            if sid is None:
                sid = memo.ids[key] = len(memo.sets)
                memo.sets.append(key)
        return sid, matched

    def _closure(
        self, starts: set[int], prev: str | None, follows: int
    ) -> tuple[frozenset[int], bool]:
        """The `char` instructions reachable without consuming, and whether `match` is."""
        seen: set[int] = set()
        chars: set[int] = set()
        stack = list(starts)
        matched = False
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            ins = self._prog[pc]
            kind = ins[0]
            if kind == "char":
                chars.add(pc)
            elif kind == "match":
                matched = True
            elif kind == "jmp":
                stack.append(ins[1])
            elif kind == "split":
                stack.extend((ins[1], ins[2]))
            elif self._holds(ins[1], prev, follows):
                stack.append(pc + 1)
        return frozenset(chars), matched

    def _holds(self, kind: Any, prev: str | None, follows: int) -> bool:
        multiline = bool(self._flags & C.SRE_FLAG_MULTILINE)
        if kind is C.AT_BEGINNING_STRING or (kind is C.AT_BEGINNING and not multiline):
            return prev is None
        if kind is C.AT_BEGINNING:
            return prev is None or prev == "\n"
        if kind is C.AT_END_STRING:
            return follows == _END
        if kind is C.AT_END:
            return follows in ((_END, _LAST_NL, _NL) if multiline else (_END, _LAST_NL))
        boundary = (prev is not None and _is_word(prev)) != (follows == _WORD)
        if kind is C.AT_BOUNDARY:
            return boundary
        if kind is C.AT_NON_BOUNDARY:
            return not boundary
        raise UnsafePattern(f"assertion {kind} is not supported")


class _Memo:
    """Interned NFA state sets and memoised steps (a lazy DFA); replaced whole when full."""

    def __init__(self) -> None:
        self.ids: dict[tuple[int, ...], int] = {}
        self.sets: list[tuple[int, ...]] = []
        self.steps: dict[tuple[int, str, int], tuple[int, bool]] = {}


def _follows(text: str, i: int) -> int:
    if i >= len(text):
        return _END
    ch = text[i]
    if ch == "\n":
        return _LAST_NL if i == len(text) - 1 else _NL
    return _WORD if _is_word(ch) else _OTHER


def _class_pred(items: list[tuple[Any, Any]]) -> Pred:
    literals: set[str] = set()
    ranges: list[tuple[int, int]] = []
    categories: list[Pred] = []
    for op, av in items:
        if op is C.LITERAL:
            literals.add(chr(av))
        elif op is C.RANGE:
            ranges.append((av[0], av[1]))
        elif op is C.CATEGORY and av in _CATEGORIES:
            categories.append(_CATEGORIES[av])
        else:
            raise UnsafePattern(f"{str(op).lower()} {av} is not supported in a class")

    def inside(ch: str) -> bool:
        code = ord(ch)
        return (
            ch in literals
            or any(lo <= code <= hi for lo, hi in ranges)
            or any(p(ch) for p in categories)
        )

    return inside
