"""The shipped systemd units pass `systemd-analyze verify` with no warning."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_verify_cleanly(tmp_path: Path) -> None:
    exe = shutil.which("modelfs")
    assert exe, "the modelfs console script is not installed"
    names = []
    for unit in sorted(UNITS.glob("*.service")):
        # The units name /usr/local/bin/modelfs; verify checks the binary exists.
        text = unit.read_text().replace("/usr/local/bin/modelfs", exe)
        name = unit.name.replace("@.service", "@org-model.service")  # an instance of a template
        (tmp_path / name).write_text(text)
        names.append(str(tmp_path / name))
    assert len(names) == 2
    res = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], capture_output=True,
                         text=True)
    ours = [ln for ln in (res.stdout + res.stderr).splitlines() if str(tmp_path) in ln
            or "modelfs" in ln]
    assert res.returncode == 0 and ours == [], res.stdout + res.stderr
    service = (UNITS / "modelfs.service").read_text()
    assert "Type=notify" in service and "Restart=on-failure" in service
