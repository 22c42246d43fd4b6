"""The test harness reports a failure whose traceback lacks line numbers (Python 3.11,
a timeout's signal landing on an instruction without one) as a failure of its test."""

from __future__ import annotations

import types

import pytest

from ..conftest import _repair


def _fail() -> None:
    try:
        raise ValueError("stuck")
    except KeyError:
        pass


def _failure_without_line_numbers() -> ValueError:
    try:
        _fail()
    except ValueError as exc:
        tb = exc.__traceback__
        assert tb is not None and tb.tb_next is not None
        # The inner entry moved to an instruction of the handler's clean-up code,
        # which has no line number.
        code = tb.tb_next.tb_frame.f_code
        start = next(a for a, _, line in code.co_lines() if line is None)
        inner = types.TracebackType(None, tb.tb_next.tb_frame, start, -1)
        exc.__traceback__ = types.TracebackType(inner, tb.tb_frame, tb.tb_lasti, tb.tb_lineno)
        return exc
    raise AssertionError("unreachable")


def test_a_traceback_without_line_numbers_is_reported_once_repaired() -> None:
    exc = _failure_without_line_numbers()
    assert exc.__traceback__ is not None and exc.__traceback__.tb_next is not None
    assert exc.__traceback__.tb_next.tb_lineno is None
    with pytest.raises(TypeError):  # what ended a CI run with INTERNALERROR
        pytest.ExceptionInfo.from_exception(exc).getrepr()
    try:
        raise RuntimeError("teardown") from exc
    except RuntimeError as outer:
        wrapped = outer
    _repair(wrapped, set())
    text = str(pytest.ExceptionInfo.from_exception(wrapped).getrepr())
    assert "stuck" in text and "teardown" in text
