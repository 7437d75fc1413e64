#!/usr/bin/env python3
"""Regenerate the Python code for every schema in proto/ (the one command).

    python tools/protogen.py            # writes splitpilot/ (the generated package)
    python tools/protogen.py --out DIR  # writes elsewhere (the drift test uses this)

The compiler is pinned: grpcio-tools bundles its own protoc, so the same pin
gives byte-identical output on every machine. tests/test_generated_drift.py
fails when the committed code differs from a fresh run of this script.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import pathlib
import sys

# Bump together with the `grpcio-tools==` pin in setup.cfg, then run `make proto`.
PINNED_GRPCIO_TOOLS = "1.85.1"

REPO = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
DEFAULT_OUT = REPO  # the generated package is REPO/splitpilot, mirroring proto/splitpilot

PACKAGE_DOC = '''"""Generated protobuf and gRPC code for the schemas in proto/.

Do not edit: every file below this package is written by
`python tools/protogen.py` (`make proto`). Hand-written code lives in pilot/,
condor_plugin/ and submit/.
"""
'''


class ProtogenError(Exception):
    """The regeneration cannot run as pinned."""


def check_pin() -> None:
    try:
        found = importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        raise ProtogenError(
            "grpcio-tools is not installed; fix: pip install 'grpcio-tools=="
            f"{PINNED_GRPCIO_TOOLS}' (make venv installs it)"
        ) from None
    if found != PINNED_GRPCIO_TOOLS:
        raise ProtogenError(
            f"grpcio-tools {found} is installed but the generated code is pinned to "
            f"{PINNED_GRPCIO_TOOLS}; fix: pip install 'grpcio-tools=={PINNED_GRPCIO_TOOLS}', "
            "or bump PINNED_GRPCIO_TOOLS here and in setup.cfg together"
        )


def proto_files() -> list[pathlib.Path]:
    files = sorted(PROTO_ROOT.rglob("*.proto"))
    if not files:
        raise ProtogenError(f"no .proto files under {PROTO_ROOT}")
    return files


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    """Write generated modules under OUT; return the files written."""
    check_pin()
    from grpc_tools import protoc  # imported late: only needed here

    include = pathlib.Path(protoc.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    written: list[pathlib.Path] = []
    for proto in proto_files():
        rel = proto.relative_to(PROTO_ROOT)
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
        ]
        has_service = any(line.lstrip().startswith("service ") for line in proto.read_text().splitlines())
        if has_service:
            args.append(f"--grpc_python_out={out}")
        args.append(str(rel))
        status = protoc.main(args)
        if status != 0:
            raise ProtogenError(f"protoc failed on {rel} (exit {status}); its message is above")
        stem = out / rel.with_suffix("")
        written += [stem.with_name(stem.name + "_pb2.py"), stem.with_name(stem.name + "_pb2.pyi")]
        if has_service:
            written.append(stem.with_name(stem.name + "_pb2_grpc.py"))
    # Package markers for every directory that holds generated code.
    top = out / "splitpilot"
    for directory in sorted({p.parent for p in written} | {top}):
        d = directory
        while True:
            init = d / "__init__.py"
            init.write_text(PACKAGE_DOC if d == top else "")
            written.append(init)
            if d == top or d == out:
                break
            d = d.parent
    return sorted(set(written))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT,
                        help="directory that receives the splitpilot/ package (default: the repository)")
    args = parser.parse_args(argv)
    try:
        files = generate(args.out)
    except ProtogenError as exc:
        print(f"protogen: error: {exc}", file=sys.stderr)
        return 2
    print(f"protogen: wrote {len(files)} files under {args.out / 'splitpilot'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
