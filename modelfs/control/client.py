"""The CLI's side of the control API: httpx over the daemon's Unix socket."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx

from ..errors import ControlError, DaemonNotRunning


class ControlClient:
    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        # trust_env off: an HTTP(S)_PROXY meant for origins must not take the local API.
        # verify=False: no TLS on a unix socket, so no CA bundle to load (~15 ms).
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path),
                                                                verify=False),
                                  base_url="http://modelfs", timeout=timeout, trust_env=False)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            resp = self._http.request(method, path, json=body)
        except (httpx.ConnectError, FileNotFoundError) as exc:
            raise DaemonNotRunning(f"no modelfs daemon on {self.socket_path} ({exc})") from None
        except httpx.TransportError as exc:
            raise ControlError(f"control socket {self.socket_path}: {exc}") from None
        if resp.status_code >= 400:
            try:
                reason = resp.json()["error"]
            except (ValueError, KeyError, TypeError):
                reason = resp.text.strip() or resp.reason_phrase
            raise ControlError(reason)
        if resp.headers.get("content-type", "").startswith("application/json"):
            return resp.json()
        return resp.text

    def alive(self) -> bool:
        """True when a daemon answers, whatever it answers (a stale socket file is not
        one, nor a daemon going away)."""
        # Probe with a plain socket first: httpcore leaks the socket of a refused connect.
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.socket_path))
            except OSError:
                return False
        try:
            self._http.request("GET", "/v1/status")
        except (httpx.TransportError, FileNotFoundError):
            # Refused, or accepted and then reset: the socket of a daemon killed a
            # moment ago can still take a connection while its process goes away.
            return False
        return True

    def prefetch(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/v1/prefetch", body)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def jobs(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/jobs")["jobs"]

    def act(self, job_id: str, action: str, item: int | None = None) -> dict[str, Any]:
        path = f"/v1/jobs/{job_id}" + (f"/items/{item}" if item is not None else "")
        return self.request("POST", f"{path}/{action}")

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/status")
