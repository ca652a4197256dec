"""HTML that survives mail clients: CSS inlined, a viewport, and a body small enough not to be clipped.

Several clients and most forwards drop a `<style>` block, so every rule is written onto the elements
it styles (css-inline, a Rust inliner: fast enough to run on every render). Only @media rules, which
cannot be inlined, stay in a `<style>` block. Gmail clips a message whose HTML passes about 102 KB,
so the body is kept under MAX_BODY_BYTES by showing fewer rows (render.py decides how many).
"""

from __future__ import annotations

import re

import css_inline

MAX_BODY_BYTES = 100_000
"""The HTML body's ceiling in bytes, below Gmail's clipping point (about 102 KB)."""

VIEWPORT = '<meta name="viewport" content="width=device-width, initial-scale=1">'

# Remote stylesheets are never fetched: a template's <link> must not make a worker fetch a URL.
_INLINER = css_inline.CSSInliner(keep_style_tags=False, keep_at_rules=True, keep_link_tags=False, load_remote_stylesheets=False)

HEAD_RE = re.compile(r"<head\b[^>]*>", re.IGNORECASE)
HTML_RE = re.compile(r"<html\b[^>]*>", re.IGNORECASE)
VIEWPORT_RE = re.compile(r"<meta\b[^>]*name\s*=\s*[\"']?viewport", re.IGNORECASE)


def for_email(html: str) -> str:
    """HTML as it goes into the email: a viewport meta and every CSS rule inlined."""
    return _INLINER.inline(with_viewport(html))


def with_viewport(html: str) -> str:
    """HTML with a viewport meta in its head, unless it has one; phones otherwise zoom out."""
    if VIEWPORT_RE.search(html):
        return html
    if match := HEAD_RE.search(html):
        return html[: match.end()] + VIEWPORT + html[match.end() :]
    if match := HTML_RE.search(html):
        return html[: match.end()] + f"<head>{VIEWPORT}</head>" + html[match.end() :]
    return f"<head>{VIEWPORT}</head>" + html


def size(html: str) -> int:
    """The body's size as a mail client counts it: UTF-8 bytes."""
    return len(html.encode("utf-8"))
