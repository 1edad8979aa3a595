"""The answer format `<think>...</think>...\\boxed{ANSWER}`: checking it and extracting the answer.

Model output is hostile by default (a policy being trained will find every slow path), so every
function here is linear in the input and bounded:
  * a completion longer than MAX_RESPONSE_CHARS scores 0 before anything looks at it;
  * the boxed answer is scanned for at most MAX_BOXED_CHARS characters (an answer longer than that
    is "overly complex" under the paper's guard anyway), so 10k nested braces cost nothing;
  * only str.find / str.rfind / str.count and regexes without nested quantifiers run on the full text.
Nothing is ever evaluated.
"""
from __future__ import annotations

import re

MAX_RESPONSE_CHARS = 64 * 1024  # the paper's 2048 response tokens are ~8k characters
MAX_BOXED_CHARS = 1024
THINK_OPEN, THINK_CLOSE, BOXED = "<think>", "</think>", "\\boxed{"

_WS_RUN = re.compile(r"\s+")


def normalize_tags(response: str) -> str:
    """Drop whitespace next to '<', '>' and '/', like the paper's reward (`re.sub(r"\\s*(<|>|/)\\s*",
    r"\\1", response)`, for models that write "< think >"). Done run by run: the paper's regex is
    quadratic on long whitespace runs."""
    if not _WS_RUN.search(response):
        return response

    def repl(m: re.Match) -> str:
        s, a, b = m.string, m.start(), m.end()
        if (b < len(s) and s[b] in "<>/") or (a > 0 and s[a - 1] in "<>/"):
            return ""
        return m.group(0)

    return _WS_RUN.sub(repl, response)


def extract_boxed(text: str, *, max_chars: int = MAX_BOXED_CHARS) -> str | None:
    """Content of the LAST `\\boxed{...}` with balanced braces, stripped; None when there is none or
    it does not close within max_chars (mathruler's extract_boxed_content, bounded)."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    i = start + len(BOXED)
    end_scan = min(len(text), i + max_chars + 1)
    depth = 0
    for j in range(i, end_scan):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            if depth == 0:
                return text[i:j].strip()
            depth -= 1
    return None


def paper_format_ok(response: str) -> bool:
    """Exactly the paper's check, `re.fullmatch(r"<think>.*</think>.*\\\\boxed\\{.*\\}.*", response,
    re.DOTALL)` (after normalize_tags), but in linear time: the text starts with <think>, and a
    </think>, then a \\boxed{, then a } follow in that order."""
    if not response.startswith(THINK_OPEN):
        return False
    p = response.find(THINK_CLOSE, len(THINK_OPEN))
    if p < 0:
        return False
    q = response.find(BOXED, p + len(THINK_CLOSE))
    if q < 0:
        return False
    return response.find("}", q + len(BOXED)) >= 0


def strict_format_ok(response: str) -> bool:
    """The paper's check plus well-formedness: exactly one <think> (at the start) and one </think>,
    and the last \\boxed{...} after </think> closes with balanced braces around a non-empty answer."""
    if not paper_format_ok(response):
        return False
    if response.count(THINK_OPEN) != 1 or response.count(THINK_CLOSE) != 1:
        return False
    p = response.find(THINK_CLOSE)
    if response.rfind(BOXED) < p:
        return False
    ans = extract_boxed(response)
    return bool(ans)


def format_reward(response: str, *, mode: str = "strict") -> float:
    """1.0 when the completion has the answer format, else 0.0. mode: "strict" (default: well-formed,
    see strict_format_ok) or "paper" (the paper's regex, see paper_format_ok)."""
    if len(response) > MAX_RESPONSE_CHARS:
        return 0.0
    r = normalize_tags(response)
    if mode == "strict":
        return 1.0 if strict_format_ok(r) else 0.0
    if mode == "paper":
        return 1.0 if paper_format_ok(r) else 0.0
    raise ValueError(f"format mode must be 'strict' or 'paper', got {mode!r}")


def answer_text(response: str) -> str:
    """What a completion answers when it has no \\boxed{}: the text after </think> (or all of it)."""
    p = response.rfind(THINK_CLOSE)
    return (response[p + len(THINK_CLOSE):] if p >= 0 else response).strip()
