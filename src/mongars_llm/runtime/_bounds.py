"""How much of a long text to tokenise before calling it too long (no torch).

Tokenising costs time in proportion to the characters, whatever the token
limit: an 8 MB embeddings request of 200,000-character inputs took 17-33 s to
be refused. A token may span many characters (SmolLM2 has an 81-character
token), so no character count alone proves a text too long; but a *prefix*
that already holds more tokens than the limit does. :func:`over_limit_prefix`
tokenises growing prefixes (4x each time, cut at a space), so refusing (or
truncating) a text costs a few times the characters the limit allows, never
the whole text.

A prefix's tokens match the whole text's except around the cut, where a word
may split differently; :data:`MARGIN` extra tokens absorb that, so a text is
never refused for a prefix that only *looks* longer.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["MARGIN", "over_limit_prefix"]

#: tokens a prefix must exceed the limit by before the whole text is called too long
MARGIN = 16


def over_limit_prefix(count: Callable[[str], int], text: str, limit: int) -> tuple[int, int] | None:
    """``(characters, tokens)`` of a prefix of ``text`` holding more than ``limit``
    tokens (plus :data:`MARGIN`), or ``None`` when no prefix was found over the
    limit before reaching the whole text (tokenise it whole then: its length
    is bounded by the last prefix tried).

    ``count`` gives the tokens of a string (special tokens or not: the margin
    covers them). Texts of at most ``4 * (limit + MARGIN) + 1024`` characters
    are never tokenised here.
    """
    window = 4 * (limit + MARGIN) + 1024
    while window < len(text):
        space = text.rfind(" ", window // 2, window)
        cut = space if space > 0 else window
        tokens = count(text[:cut])
        if tokens > limit + MARGIN:
            return cut, tokens
        window *= 4
    return None
