"""Secrets never reach a message, in whatever form a library quotes them."""

from __future__ import annotations

import io
import json
import logging
from urllib.parse import quote

from hypothesis import given
from hypothesis import strategies as st

from modelfs.cli import _Redact
from modelfs.redaction import redact, secret_forms

TOKENS = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=8,
                 max_size=60)


@given(TOKENS, st.sampled_from(["raw", "repr", "json", "quote", "crlf"]))
def test_every_form_of_a_token_is_scrubbed(token: str, form: str) -> None:
    shown = {"raw": token, "repr": repr(token + "\r"), "json": json.dumps(token),
             "quote": quote(token, safe=""), "crlf": repr(f"Bearer {token}\r\n")}[form]
    out = redact(f"LocalProtocolError: Illegal header value {shown}", secret_forms(token))
    assert token not in out and shown not in out


def test_the_log_filter_scrubs_messages_and_tracebacks() -> None:
    token = "hf_abcdefghijklmnop0123"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(_Redact(token))
    log = logging.getLogger("test_redaction")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise ValueError(f"Illegal header value {(f'Bearer {token}' + chr(13))!r}")
        except ValueError:
            log.exception("request failed for %s", token)
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "request failed for ***" in text and "Illegal header value" in text
    assert token not in text and token[4:-4] not in text
