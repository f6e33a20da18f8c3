"""Builds a handler module into a Weir component with componentize-py.

    python -m weir_sdk.build handler            # -> handler.wasm
    python -m weir_sdk.build handler -o out.wasm --path src

The module (found in the current directory, or in each `--path`) declares
its function with `@weir_sdk.handler`. The WIT is this Weir's `wit/`
(`--wit` or `WEIR_WIT` to use another); the component is built for the
`weir:function/event-handler` world.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

SDK_DIR = Path(__file__).resolve().parent.parent
WORLD = "weir:function/event-handler"
ENTRY_MODULE = "weir_component_entry"
COMPONENTIZE_PY_VERSION = "0.25.1"


def default_wit() -> Path:
    return Path(os.environ.get("WEIR_WIT") or SDK_DIR.parent.parent / "wit")


def componentize_py() -> List[str]:
    """The componentize-py command: beside this interpreter (a venv), or on the PATH."""
    beside = Path(sys.executable).parent / "componentize-py"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("componentize-py")
    if found:
        return [found]
    raise SystemExit(
        "weir_sdk.build: componentize-py is not installed; "
        f"pip install componentize-py=={COMPONENTIZE_PY_VERSION}"
    )


def entry_source(module: str) -> str:
    # The SDK's component side first (it binds the WIT imports), then the
    # handler module, whose @handler declares the function.
    return (
        "import weir_sdk._component as _component\n"
        f"import {module}  # noqa: F401\n"
        "WitWorld = _component.WitWorld\n"
    )


def build(module: str, output: Path, paths: List[Path], wit: Path) -> None:
    if not (wit / "function.wit").exists():
        raise SystemExit(f"weir_sdk.build: no function.wit in {wit}; pass --wit <Weir's wit/ dir>")
    with tempfile.TemporaryDirectory(prefix="weir-py-build-") as entry_dir:
        Path(entry_dir, f"{ENTRY_MODULE}.py").write_text(entry_source(module))
        command = componentize_py() + ["-d", str(wit), "-w", WORLD, "componentize"]
        for path in [Path(entry_dir), *paths, SDK_DIR]:
            command += ["-p", str(path)]
        command += [ENTRY_MODULE, "-o", str(output)]
        print("+", " ".join(command), file=sys.stderr)
        result = subprocess.run(command)
        if result.returncode != 0:
            raise SystemExit(f"weir_sdk.build: componentize-py failed ({result.returncode})")
    print(f"built {output} ({output.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m weir_sdk.build", description=__doc__.splitlines()[0])
    parser.add_argument("module", help="the handler module, e.g. handler")
    parser.add_argument("-o", "--output", type=Path, help="the component to write (default <module>.wasm)")
    parser.add_argument("--path", type=Path, action="append", default=[], help="where to find the module (default .)")
    parser.add_argument("--wit", type=Path, default=None, help="Weir's wit/ directory")
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in (args.path or [Path(".")])]
    output = (args.output or Path(f"{args.module.rsplit('.', 1)[-1]}.wasm")).resolve()
    build(args.module, output, paths, (args.wit or default_wit()).resolve())


if __name__ == "__main__":
    main()
