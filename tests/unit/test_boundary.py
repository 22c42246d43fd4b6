"""The FUSE error boundary: nothing but FUSEError may escape a handler."""

from __future__ import annotations

import errno

import pyfuse3
import pytest

from modelfs.errors import RemoteNotFound, RemoteUnavailable
from modelfs.fs.operations import _boundary


@pytest.mark.parametrize(("exc", "code"), [
    (RemoteNotFound("x"), errno.ENOENT),
    (RemoteUnavailable("x"), errno.EIO),
    (ZeroDivisionError("bug"), errno.EIO),
    (pyfuse3.FUSEError(errno.EROFS), errno.EROFS),
])
async def test_boundary_maps_errors(exc: Exception, code: int, caplog: pytest.LogCaptureFixture) -> None:
    @_boundary
    async def handler() -> None:
        raise exc

    with pytest.raises(pyfuse3.FUSEError) as got:
        await handler()
    assert got.value.errno == code
    if isinstance(exc, ZeroDivisionError):
        assert "unexpected error in FUSE handler" in caplog.text
        assert "ZeroDivisionError: bug" in caplog.text
