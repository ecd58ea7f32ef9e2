"""Text from DICOM files, file names and URL parameters, made safe for Streamlit's Markdown.

Streamlit renders the body of ``st.subheader``, ``st.warning``, ``st.caption`` and
the like as GitHub-flavoured Markdown: an image written into a Series
Description would make the browser fetch its URL, a link would be clickable.
:func:`plain` escapes every ASCII punctuation character (CommonMark lets any of
them be escaped) and turns control characters into spaces, so the text forms no
block, emphasis, link, image, HTML or math. GFM also turns bare ``http://``,
``www.`` and e-mail addresses in the *rendered* text into links, escapes or not;
an invisible WORD JOINER (U+2060) before each ``:``, ``@`` and after ``www``
keeps them text. What the reader sees is the original text.
"""

from __future__ import annotations

import re
import string

WORD_JOINER = "\u2060"
_PUNCTUATION = re.compile("([" + re.escape(string.punctuation) + "])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_LINK_START = re.compile(r"(?i)(www)(?=\\\.)")


def plain(text: object) -> str:
    """``text`` as Markdown that renders to exactly that text, on one line, with no link."""
    escaped = _PUNCTUATION.sub(r"\\\1", _CONTROL.sub(" ", str(text)))
    escaped = escaped.replace("\\:", WORD_JOINER + "\\:").replace("\\@", WORD_JOINER + "\\@")
    return _LINK_START.sub(r"\1" + WORD_JOINER, escaped)
