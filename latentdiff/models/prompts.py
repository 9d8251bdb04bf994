"""Prompts as AUTOMATIC1111 users write them: emphasis, ``BREAK`` and chunks of tokens. Text only (no torch).

    parse_prompt_attention("a (cat:1.3) on a [mat]")   # [('a ', 1.0), ('cat', 1.3), (' on a ', 1.0), ('mat', 0.909...)]
    prompt_chunks("a (cat:1.3)", encode, chunk_length=75, comma_token=267)   # [([320, 2368], [1.0, 1.3])]

Syntax (the semantics of AUTOMATIC1111's ``modules/prompt_parser.py``, ``parse_prompt_attention``):

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` multiplies it by
  1.3 (spaces around the number are allowed); brackets nest and their factors multiply.
- ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the literal characters; a lone backslash is dropped.
- An unbalanced ``(`` or ``[`` applies its factor to everything after it; an unmatched ``)`` or ``]`` is text.
- ``BREAK`` (upper case, a word of its own) ends the current chunk: the text after it starts a new one.
- Runs of equal weight are merged; an empty prompt is ``[('', 1.0)]``.

One departure, where AUTOMATIC1111 raises: ``(text:1.2.3)`` (a number Python cannot read) keeps ``:1.2.3)`` as text.

Chunking (``FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`` of ``modules/sd_hijack_clip.py``): the tokens of
each weighted piece fill chunks of ``chunk_length`` tokens (75 for a 77-token encoder: the start and end tokens take
the other two). When a chunk is full and a comma lies within the last :data:`COMMA_BACKTRACK` tokens, the tokens
after that comma move on to the next chunk (AUTOMATIC1111's ``comma_padding_backtrack`` setting, default 20).
"""

from __future__ import annotations

import re
from collections.abc import Callable

ROUND_FACTOR = 1.1  # (text)
SQUARE_FACTOR = 1 / 1.1  # [text]
COMMA_BACKTRACK = 20  # tokens; AUTOMATIC1111's default comma_padding_backtrack
BREAK = "BREAK"  # a BREAK is the piece (BREAK, -1.0) in a parsed prompt

# One match per syntax element, tried in this order: escapes, brackets, ":number)", plain text, a lone colon.
_ELEMENT = re.compile(r"""
\\\( | \\\) | \\\[ | \\] | \\\\ | \\ |
\( | \[ |
:\s*([+-]?[.\d]+)\s*\) |
\) | ] |
[^\\()\[\]:]+ |
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A prompt -> its pieces ``(text, weight)`` in order; a BREAK is the piece ``("BREAK", -1.0)``.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    open_round: list[int] = []  # index into pieces where each open "(" started
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ELEMENT.finditer(text):
        element, number = match.group(0), match.group(1)
        factor = _number(number) if number is not None and open_round else None
        if element.startswith("\\"):
            pieces.append([element[1:], 1.0])
        elif element == "(":
            open_round.append(len(pieces))
        elif element == "[":
            open_square.append(len(pieces))
        elif factor is not None:
            scale_from(open_round.pop(), factor)
        elif element == ")" and open_round:
            scale_from(open_round.pop(), ROUND_FACTOR)
        elif element == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_FACTOR)
        else:
            for i, part in enumerate(_BREAK.split(element)):
                if i > 0:
                    pieces.append([BREAK, -1.0])
                pieces.append([part, 1.0])
    for start in open_round:  # unbalanced: the factor applies to the end of the prompt
        scale_from(start, ROUND_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_FACTOR)
    if not pieces:
        pieces = [["", 1.0]]
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(t, float(w)) for t, w in merged]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "1.2.3", ".": AUTOMATIC1111 raises here; we keep the element as text
        return None


def is_break(piece: tuple[str, float]) -> bool:
    return piece[0] == BREAK and piece[1] == -1


def prompt_chunks(prompt: str, encode: Callable[[str], list[int]], chunk_length: int, comma_token: int,
                  backtrack: int = COMMA_BACKTRACK) -> list[tuple[list[int], list[float]]]:
    """A prompt -> its chunks ``(tokens, weights)``, each at most ``chunk_length`` BPE tokens (without the start and
    end tokens) with one weight per token; at least one chunk (the empty prompt's is empty).

    ``encode(text) -> ids`` is the BPE of one piece, without start/end tokens (each weighted piece is encoded on its
    own, as AUTOMATIC1111 does). ``backtrack=0`` turns the move of the tokens after the last comma off.
    """
    if chunk_length < 1:
        raise ValueError(f"chunk_length={chunk_length} must be >= 1")
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1  # position of the last comma in the current chunk

    def close_chunk() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for piece in parse_prompt_attention(prompt):
        if is_break(piece):
            close_chunk()
            continue
        text, weight = piece
        for token in encode(text):
            if token == comma_token:
                last_comma = len(tokens)
            elif (backtrack and len(tokens) == chunk_length and last_comma != -1
                  and len(tokens) - last_comma <= backtrack):
                cut = last_comma + 1  # the comma stays; what follows it moves on
                moved = tokens[cut:], weights[cut:]
                del tokens[cut:], weights[cut:]
                close_chunk()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == chunk_length:
                close_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close_chunk()
    return chunks
