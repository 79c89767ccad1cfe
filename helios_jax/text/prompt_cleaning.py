"""Prompt cleaning as Helios and the diffusers Helios pipelines do it before tokenising (spec B.7)."""
from __future__ import annotations

import html
import re

import ftfy

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """ftfy's default repair (mojibake, curly quotes, ...), HTML entities decoded twice (so that
    `&amp;lt;` becomes `<`), then every run of Unicode whitespace collapsed to one space and the ends
    stripped."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()
