"""Keeping secrets (tokens, keys) out of messages, in every form they can take.

A token is quoted back in error messages by the libraries that refuse it (h11
quotes an invalid header value, escaped), so looking for the raw string alone
is not enough: `secret_forms` lists the forms, `redact` replaces them.
"""

from __future__ import annotations

import json
from urllib.parse import quote


def secret_forms(secret: str) -> list[str]:
    """Every way `secret` can appear in a message: as is, escaped by `repr` or JSON,
    URL-quoted, and its long inner part (a message quoting a header may cut or
    re-escape its ends)."""
    derived = {repr(secret)[1:-1], json.dumps(secret)[1:-1], quote(secret, safe="")}
    if len(secret) >= 16:
        derived.add(secret[4:-4])
    forms = {secret} | {f for f in derived if len(f) >= 8}  # short inner parts match too much
    return sorted((f for f in forms if f), key=len, reverse=True)


def redact(text: str, forms: list[str]) -> str:
    for form in forms:
        if form in text:
            text = text.replace(form, "***")
    return text
