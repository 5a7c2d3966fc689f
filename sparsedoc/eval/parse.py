"""Read the chosen option(s) out of a free-form model answer (the generate-then-parse scorer).

Rules, tried in order; the first that gives an answer wins:

1. an explicit answer marker: ``答案：C``, ``正确答案是B``, ``故选C``, ``The answer is (B)``,
   ``Answer: A and C``, ``the correct option is D``; or a marker followed by an option's text
   (``Answer: maybe``);
2. the output starts with the letter(s): ``B``, ``(B) ...``, ``C. 卫生行政主管部门``, ``A、B、D``
   (a bare ``A`` followed by a word, as in "A 45-year-old man", is an article, not an answer;
   an echo of the option list, ``A. xx\nB. yy``, is not an answer either);
3. the output starts with one option's text, or exactly one option's text occurs in it
   (``Yes, the study ...``);
4. exactly one distinct option letter stands alone anywhere in the output.

Anything else is *unparsed* (``None``): the caller counts it and scores it wrong, never guesses.
The parser sees only the output and the options, never the gold answer. Several letters come
back sorted (``"ABD"``) so multi-answer items compare as sets.
"""

from __future__ import annotations

import re

_FULLWIDTH = str.maketrans({**{chr(0xFF21 + i): chr(0x41 + i) for i in range(26)},
                            "（": "(", "）": ")", "：": ":", "，": ",", "．": ".", "【": "[",
                            "】": "]"})
_SEP = r"[ \t]*(?:[,、/&]|(?i:and)|和|及|与)?[ \t]*"  # never across a line break
_MARKERS = [
    r"(?:正确)?答案(?:应该|应当|应|是|为|选|:|\s)*",
    r"(?:故|应|所以|因此|综上)(?:应)?选(?:择)?\s*:?\s*",
    r"(?i:(?:(?:final|correct|right|best)\s+)?answer"
    r"(?:\s+(?:is|would\s+be|should\s+be))?\s*:?\s*(?:option\s+|choice\s+)?)",
    r"(?i:(?:final|correct|right|best)\s+(?:option|choice)"
    r"(?:\s+(?:is|would\s+be|should\s+be))?\s*:?\s*)",
]


_NOT_AFTER_ARTICLE = {"or", "and", "is", "are", "was", "seems", "would", "should", "could",
                      "might", "may", "to", "as"}


def _letters_re(letters: str) -> str:
    cls = "[" + re.escape(letters) + "]"
    # not a word ("Also"), not hyphenated ("B-cell"), not one of alternatives ("B或C", "B or C")
    return (rf"({cls}(?:{_SEP}{cls})*)(?![A-Za-z])(?!-[A-Za-z])"
            rf"(?!\s*(?:或|(?i:or))\s*{cls}(?![A-Za-z]))")


def _normalise(text: str) -> str:
    return text.translate(_FULLWIDTH).replace("**", "").replace("__", "").strip()


def _join(found: str, letters: str) -> str:
    return "".join(sorted({c for c in found if c in letters}))


def _text_hits(text: str, option_texts: dict[str, str]) -> list[str]:
    """Letters whose option text occurs in ``text`` (whole words for Latin text), dropping
    options whose text is part of another hit's text (``肝`` inside ``肝硬化``)."""
    hits = {}
    low = text.lower()
    for letter, opt in option_texts.items():
        o = opt.strip().lower()
        if not o:
            continue
        if re.fullmatch(r"[\x00-\x7f]+", o):
            if re.search(rf"(?<![a-z0-9]){re.escape(o)}(?![a-z0-9])", low):
                hits[letter] = o
        elif o in low:
            hits[letter] = o
    return [k for k, o in hits.items()
            if not any(o != o2 and o in o2 for o2 in hits.values())]


def _starts_with_text(text: str, option_texts: dict[str, str]) -> str | None:
    """The option whose text opens ``text`` (the longest), unless an alternative follows
    ("yes or no")."""
    low = text.lower()
    best = None
    for letter, opt in option_texts.items():
        o = opt.strip().lower()
        if o and low.startswith(o) and not re.match(r"[a-z0-9]", low[len(o):len(o) + 1]):
            if best is None or len(o) > len(option_texts[best].strip()):
                best = letter
    if best is not None:
        rest = low[len(option_texts[best].strip()):]
        m = re.match(r"\s*(?:or|或|/)\s*", rest)
        if m and _starts_with_text(rest[m.end():], option_texts):
            return None
    return best


def _is_article(after: str) -> bool:
    m = re.match(r"\s+([a-z0-9][a-z0-9-]*)", after)
    return bool(m) and m.group(1) not in _NOT_AFTER_ARTICLE


def _is_option_list(text: str, letters: str) -> bool:
    """An echo of the option list: two or more lines open with different letters."""
    cls = "[" + re.escape(letters) + "]"
    starts = {m.group(1) for m in re.finditer(rf"(?m)^\s*\(?({cls})\s*[.)、:]", text)}
    return len(starts) >= 2


def parse_choice(output: str, letters: str, option_texts: dict[str, str] | None = None,
                 accept_letters: bool = True) -> str | None:
    """The option letter(s) a free-form answer picks, sorted, or ``None`` if it cannot be read.

    Args:
        output: the model's generated text.
        letters: the valid option letters of the item, e.g. ``"ABCDE"``.
        option_texts: ``{letter: option text}``, to read answers given as text (``yes``).
        accept_letters: False for items whose prompt showed no letters (PubMedQA's yes/no/maybe
            is asked as text): only option texts count then.
    """
    text = _normalise(output)
    if not text:
        return None
    option_texts = option_texts or {}
    letters_re = _letters_re(letters)
    # 1. explicit answer markers
    for marker in _MARKERS:
        for m in re.finditer(marker, text):
            rest = text[m.end():]
            if accept_letters:
                lm = re.match(r"\s*[(\[]?" + letters_re, rest)
                if lm:
                    return _join(lm.group(1), letters)
            start = _starts_with_text(rest.lstrip(" ([\"'"), option_texts)
            if start:
                return start
    if accept_letters and not _is_option_list(text, letters):
        # 2. leading letter(s): bracketed, or bare and followed by punctuation / end / non-Latin
        m = re.match(r"[(\[]" + letters_re + r"\s*[)\]]", text)
        if m:
            return _join(m.group(1), letters)
        m = re.match(letters_re + r"(?=$|\s*[.。:,)\]\n]|\s*[^\x00-\x7f])", text)
        if m:
            return _join(m.group(1), letters)
    # 3. option text at the start, or exactly one option text anywhere
    start = _starts_with_text(text, option_texts)
    if start:
        return start
    hits = _text_hits(text, option_texts)
    if len(hits) == 1:
        return hits[0]
    if accept_letters:
        # 4. exactly one distinct standalone letter (not the article in "A 45-year-old man")
        cls = "[" + re.escape(letters) + "]"
        alone = rf"(?<![A-Za-z]){cls}(?![A-Za-z])(?!-[A-Za-z])"
        found = {m.group(0) for m in re.finditer(alone, text)
                 if not (m.group(0) == "A" and _is_article(text[m.end():]))}
        if len(found) == 1:
            return found.pop()
    return None
