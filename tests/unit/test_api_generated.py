"""The committed proxy/api/ modules are exactly what tools/genproto.py generates from proto/,
and they import cleanly with the installed protobuf runtime."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
GENPROTO = REPO_ROOT / "tools" / "genproto.py"


def test_generated_modules_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(GENPROTO), "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, (
        "proxy/api/ differs from a fresh generation; run `make proto` and commit the result\n"
        + result.stdout
        + result.stderr
    )


# Imports every module under proxy.api in a fresh interpreter with warnings as errors, so a
# gencode/runtime version warning or a broken absolute import in a purerpc *_grpc.py module fails.
_IMPORT_ALL = """
import importlib, pkgutil
import proxy.api
names = [m.name for m in pkgutil.walk_packages(proxy.api.__path__, "proxy.api.")]
for name in names:
    importlib.import_module(name)
assert any(n.endswith("_pb2") for n in names) and any(n.endswith("_grpc") for n in names), names
print(len(names))
"""


def test_generated_modules_import_without_warnings() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", _IMPORT_ALL],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "", result.stderr
