"""Regenerate the protobuf and purerpc modules in proxy/api/ from the .proto files in proto/.

Usage (from anywhere; paths are relative to the repository root):

    python tools/genproto.py           # regenerate proxy/api/ in place
    python tools/genproto.py --check   # exit 1 (with a diff summary) if proxy/api/ is stale

protoc comes from grpcio-tools (``python -m grpc_tools.protoc``), the purerpc plugin from the
``protoc-gen-purerpc`` script next to the running interpreter. Generation always happens in a
temporary directory first; every generated package directory gets an empty ``__init__.py`` so
that it is a regular package. The output depends only on the .proto files and the pinned tool
versions, so it is byte-identical on every run.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import grpc_tools

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "proto"
# The generated tree, relative to the output root (the .proto paths under proto/ start with it).
API_REL = Path("proxy") / "api"
API_DIR = REPO_ROOT / API_REL
GRPC_TOOLS_INCLUDE = Path(grpc_tools.__file__).resolve().parent / "_proto"

# How much of a per-file diff --check prints.
MAX_DIFF_LINES = 40
MAX_LINE_CHARS = 160


def proto_files() -> list[str]:
    """The .proto files under proto/, as protoc import paths, in a stable order."""
    return sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))


def purerpc_plugin() -> Path:
    """protoc-gen-purerpc installed next to the running interpreter (not resolved: venv)."""
    plugin = Path(sys.executable).parent / "protoc-gen-purerpc"
    if not plugin.exists():
        raise SystemExit(f"genproto: {plugin} not found (is purerpc installed in this venv?)")
    return plugin


def generate(out_root: Path) -> None:
    """Run protoc into out_root and add the package __init__.py files under out_root/proxy/api."""
    protos = proto_files()
    if not protos:
        raise SystemExit(f"genproto: no .proto files under {PROTO_DIR}")
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR.relative_to(REPO_ROOT)}",
        f"-I{GRPC_TOOLS_INCLUDE}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--purerpc_out={out_root}",
        f"--plugin=protoc-gen-purerpc={purerpc_plugin()}",
        *protos,
    ]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0 or result.stderr.strip():
        sys.stderr.write(result.stdout + result.stderr)
        if result.returncode != 0:
            raise SystemExit(f"genproto: protoc failed with exit code {result.returncode}")
    api_out = out_root / API_REL
    for directory in [api_out, *sorted(p for p in api_out.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").write_bytes(b"")


def tree_files(root: Path) -> dict[str, bytes]:
    """Every file under root (except bytecode caches), keyed by its posix path relative to root."""
    if not root.is_dir():
        return {}
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def _clip(line: str, start: int) -> str:
    """Clip a long diff line to MAX_LINE_CHARS characters from about `start` (keeps the marker)."""
    line = line if line.endswith("\n") else line + "\n"
    if len(line) <= MAX_LINE_CHARS:
        return line
    start = max(0, min(start, len(line) - MAX_LINE_CHARS))
    head = line[0] + ("[...]" if start > 1 else "")
    tail = "[...]" if start + MAX_LINE_CHARS < len(line) - 1 else ""
    return head + line[max(1, start) : start + MAX_LINE_CHARS].rstrip("\n") + tail + "\n"


def _divergence(diff: list[str]) -> int:
    """Where the first removed and first added lines start to differ (to aim the clipping)."""
    old = next((line for line in diff if line.startswith("-") and not line.startswith("---")), "")
    new = next((line for line in diff if line.startswith("+") and not line.startswith("+++")), "")
    common = 1  # index 0 is the -/+ marker
    for a, b in zip(old[1:], new[1:], strict=False):
        if a != b:
            break
        common += 1
    return max(0, common - MAX_LINE_CHARS // 2)


def compare(committed: dict[str, bytes], fresh: dict[str, bytes]) -> list[str]:
    """A human-readable report of the differences; empty when the trees are equal."""
    report: list[str] = []
    prefix = API_REL.as_posix()
    for name in sorted(fresh.keys() - committed.keys()):
        report.append(f"missing (generated but not committed): {prefix}/{name}\n")
    for name in sorted(committed.keys() - fresh.keys()):
        report.append(f"extra (committed but not generated): {prefix}/{name}\n")
    for name in sorted(fresh.keys() & committed.keys()):
        if fresh[name] == committed[name]:
            continue
        report.append(f"differs: {prefix}/{name}\n")
        diff = list(
            difflib.unified_diff(
                committed[name].decode("utf-8", "replace").splitlines(keepends=True),
                fresh[name].decode("utf-8", "replace").splitlines(keepends=True),
                fromfile=f"committed/{prefix}/{name}",
                tofile=f"generated/{prefix}/{name}",
            )
        )
        start = _divergence(diff)
        shown = [_clip(line, start) for line in diff]
        report.extend(shown[:MAX_DIFF_LINES])
        if len(shown) > MAX_DIFF_LINES:
            report.append(f"... ({len(shown) - MAX_DIFF_LINES} more diff lines)\n")
    return report


def check() -> int:
    with tempfile.TemporaryDirectory(prefix="genproto-") as tmp:
        out_root = Path(tmp)
        generate(out_root)
        report = compare(tree_files(API_DIR), tree_files(out_root / API_REL))
    if report:
        sys.stdout.write(f"{API_REL.as_posix()}/ is out of date with proto/ (run `make proto`):\n")
        sys.stdout.writelines(report)
        return 1
    print(f"{API_REL.as_posix()}/ is up to date with proto/")
    return 0


def write() -> int:
    with tempfile.TemporaryDirectory(prefix="genproto-") as tmp:
        out_root = Path(tmp)
        generate(out_root)
        fresh = tree_files(out_root / API_REL)
    committed = tree_files(API_DIR)
    for name in sorted(committed.keys() - fresh.keys()):
        (API_DIR / name).unlink()
        print(f"removed {API_REL.as_posix()}/{name}")
    for name, content in sorted(fresh.items()):
        if committed.get(name) == content:
            continue
        target = API_DIR / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        print(f"wrote {API_REL.as_posix()}/{name}")
    # Drop package directories left empty by removed protos.
    for directory in sorted((p for p in API_DIR.rglob("*") if p.is_dir()), reverse=True):
        if directory.name == "__pycache__":
            continue
        remaining = [p for p in directory.iterdir() if p.name != "__pycache__"]
        if not remaining:
            shutil.rmtree(directory)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temporary directory and compare with proxy/api/ (exit 1 if stale)",
    )
    args = parser.parse_args(argv)
    return check() if args.check else write()


if __name__ == "__main__":
    sys.exit(main())
