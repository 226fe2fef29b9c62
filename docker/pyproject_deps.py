"""Build helper for the Docker images (stdlib only; runs on the image's own Python, 3.10+).

    pyproject_deps.py requirements PYPROJECT [EXTRA ...]  -> gptforge's dependencies, minus torch
    pyproject_deps.py constraints                         -> name==version of the image's torch stack
    pyproject_deps.py check CONSTRAINTS                   -> exit 1 if any of those changed

The images install gptforge on top of the vendor's torch build (CUDA/ROCm). torch is therefore never
handed to pip as a requirement, and the torch stack that came with the image (torch, its companions,
triton, numpy) is pinned by a constraints file so no other dependency can pull in a replacement.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

# Packages the vendor image owns; pinned to the versions it ships.
IMAGE_OWNED = ("torch", "torchvision", "torchaudio", "triton", "pytorch-triton", "pytorch-triton-rocm", "numpy")
NEVER_INSTALL = {"torch", "torchvision", "torchaudio"}


def _load_toml(path: str) -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # Python 3.10 (ROCm image): pip vendors a TOML parser
        from pip._vendor import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as f:
        return tomllib.load(f)


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[@]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    project = _load_toml(pyproject)["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"pyproject_deps: unknown extra '{extra}' (have: {', '.join(sorted(optional))})")
        reqs += optional[extra]
    return [r for r in reqs if _name(r) not in NEVER_INSTALL]


def constraints() -> list[str]:
    out = []
    for name in IMAGE_OWNED:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return out


def check(path: str) -> int:
    bad = []
    with open(path) as f:
        for line in f:
            name, _, want = line.strip().partition("==")
            if name:
                try:
                    have = metadata.version(name)
                except metadata.PackageNotFoundError:
                    have = "missing"
                if have != want:
                    bad.append(f"{name}: image had {want}, now {have}")
    for b in bad:
        print(f"pyproject_deps: the image's torch stack changed: {b}", file=sys.stderr)
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["requirements"] and len(argv) >= 2:
        extras = [e for a in argv[2:] for e in a.replace(",", " ").split()]
        print("\n".join(requirements(argv[1], extras)))
        return 0
    if argv == ["constraints"]:
        print("\n".join(constraints()))
        return 0
    if argv[:1] == ["check"] and len(argv) == 2:
        return check(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
