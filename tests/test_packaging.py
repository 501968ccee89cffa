"""The distribution declares its licence and ships it in the wheel and the sdist."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_declares_the_mit_licence_file() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert project["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 The netserve developers" in text


def test_wheel_and_sdist_carry_the_licence(tmp_path: Path) -> None:
    # The build backend itself, in a fresh interpreter: no index, a fraction of a second.
    code = (
        "import sys, hatchling.build as b;"
        "print(b.build_wheel(sys.argv[1]));"
        "print(b.build_sdist(sys.argv[1]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    wheel_name, sdist_name = result.stdout.split()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    name = f"netserve-{version}"
    licence = (ROOT / "LICENSE").read_bytes()
    with zipfile.ZipFile(tmp_path / wheel_name) as wheel:
        assert wheel.read(f"{name}.dist-info/licenses/LICENSE") == licence
        metadata = wheel.read(f"{name}.dist-info/METADATA").decode()
    assert "License-Expression: MIT\n" in metadata
    assert "License-File: LICENSE\n" in metadata
    with tarfile.open(tmp_path / sdist_name) as sdist:
        member = sdist.extractfile(f"{name}/LICENSE")
        assert member is not None
        with member:
            assert member.read() == licence
