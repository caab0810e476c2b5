"""Write the code files of the model folders under models/ from the repository's: `python -m models.sync`.

A model folder carries copies of configuration_armt.py and modeling_armt.py, which `from_pretrained(...,
trust_remote_code=True)` loads (a Hub copy of the folder works without this repository). Run this after changing
either file; `--check` writes nothing and exits 1 when a copy is stale. tests/test_default_model.py checks the
copies too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE_FILES = ("configuration_armt.py", "modeling_armt.py")


def model_folders(models: Path = ROOT / "models") -> list[Path]:
    """The folders under `models` whose config.json is an ARMT's."""
    folders = []
    for config in sorted(models.glob("*/config.json")):
        if json.loads(config.read_text(encoding="utf-8")).get("model_type") == "armt":
            folders.append(config.parent)
    return folders


def stale_files(folder: Path) -> list[Path]:
    """The code files of `folder` that differ from (or lack) the repository's."""
    return [folder / name for name in CODE_FILES
            if not (folder / name).is_file() or (folder / name).read_bytes() != (ROOT / name).read_bytes()]


def write(path: Path, data: bytes) -> None:
    """Replace `path` atomically (a stopped run leaves the old file or the new one, never half of one)."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.sync", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a copy is stale")
    parser.add_argument("--models", type=Path, default=ROOT / "models", metavar="DIR",
                        help="the folder that holds the model folders (default: the repository's models/)")
    args = parser.parse_args(argv)
    if not args.models.is_dir():
        parser.error(f"--models {args.models} is not a folder: pass the folder that holds the model folders.")
    stale = [path for folder in model_folders(args.models) for path in stale_files(folder)]
    for path in stale:
        if args.check:
            print(f"stale: {path}")
        else:
            write(path, (ROOT / path.name).read_bytes())
            print(f"wrote {path}")
    if not stale:
        print(f"{args.models}: every model folder's code matches the repository's")
    return int(args.check and bool(stale))


if __name__ == "__main__":
    sys.exit(main())
