"""Keeping secrets (tokens, keys) out of messages, in every form they can take.

A token is quoted back in error messages by the libraries that refuse it (h11
quotes an invalid header value, escaped), so looking for the raw string alone
is not enough: `secret_forms` lists the forms, `redact` replaces them.
"""

from __future__ import annotations

import base64
import json
from urllib.parse import quote


def secret_forms(secret: str) -> list[str]:
    """Every way `secret` can appear in a message: as is, escaped by `repr` or JSON,
    URL-quoted, base64-encoded (Basic auth), and its long inner part (a message
    quoting a header may cut or re-escape its ends)."""
    forms = {secret, repr(secret)[1:-1], json.dumps(secret)[1:-1], quote(secret, safe=""),
             base64.b64encode(secret.encode("utf-8", "replace")).decode()}
    if len(secret) >= 16:
        forms.add(secret[4:-4])
    return sorted((f for f in forms if len(f) >= 8), key=len, reverse=True)


def redact(text: str, forms: list[str]) -> str:
    for form in forms:
        if form in text:
            text = text.replace(form, "***")
    return text
