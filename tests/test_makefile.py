"""The Makefile's suite targets: each runs when asked, whatever files lie beside it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("target", ["bench-held-out-seed1", "bench-draw-997",
                                    "bench-later-seed2"])
def test_a_suite_target_runs_though_a_file_of_its_name_exists(tmp_path: Path,
                                                              target: str) -> None:
    # A .PHONY line expands its lists where it stands: above their definitions they were empty,
    # and a stray file named like a suite made it "up to date", the suite silently not rerun.
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".venv").mkdir()
    stamp = tmp_path / ".venv" / ".installed"  # installed, so only the target's own file counts
    stamp.touch()
    (tmp_path / target).touch()
    os.utime(stamp, (1_000_000_000, 1_000_000_000))
    os.utime(tmp_path / "pyproject.toml", (999_999_000, 999_999_000))
    shown = subprocess.run(["make", "-n", target], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60)
    assert "is up to date" not in shown.stdout + shown.stderr
    assert "bench suite" in shown.stdout, shown.stdout + shown.stderr
