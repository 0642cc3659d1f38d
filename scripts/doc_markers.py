"""Rewrites the generated part of a markdown document between two marker lines.

Used by the scripts that write tables into docs/ (``ablate.py``, ``segment_proposals_table.py``):
the hand-written text outside the markers is kept as it is.
"""

from __future__ import annotations

import os


def write_between_markers(path: str, generated: str, begin: str, end: str, new_doc: str) -> None:
    """Replaces ``begin ... end`` in ``path`` with ``generated`` (which holds both markers).

    A document without the markers gets ``generated`` appended; a missing document is
    written as ``new_doc.format(generated=generated)``.
    """
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if begin in text and end in text:
            text = text[: text.index(begin)] + generated + text[text.index(end) + len(end) :]
        else:
            text = text.rstrip("\n") + "\n\n" + generated + "\n"
    else:
        text = new_doc.format(generated=generated)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
