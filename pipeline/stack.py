"""The installed stack, checked: the packages whose ABI or numbers matter must be the versions that are tested.

    python -m pipeline.stack        # exit 0 and one line of versions, or exit 1 naming the mismatched pair

torchaudio's native library is built against one torch release: a torchaudio of another release fails at import
(`libtorchaudio.so: undefined symbol ...`), and transformers imports torchaudio, so everything fails. The pins
live in infra/constraints.txt (the one lock file the README, .ci/run and the image install with); this module
only reads what is installed and says what is wrong before anything else runs.
"""

from __future__ import annotations

import sys
from importlib import metadata

# Packages that must come from the same release train (torchaudio X.Y.Z is built for torch X.Y.Z).
PAIRED = (("torch", "torchaudio"),)
# Packages whose versions change numbers or binary interfaces; each must be installed.
CHECKED = ("torch", "torchaudio", "transformers", "ray", "pyarrow", "av", "numpy")
FIX = "reinstall with the pinned versions: pip install -c infra/constraints.txt -e ."


def _base(version: str) -> str:
    """'2.11.0+cu130' -> '2.11.0' (the local build tag does not change the release)."""
    return version.split("+", 1)[0]


def installed_versions(names: tuple[str, ...] = CHECKED) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def mismatches(versions: dict[str, str | None]) -> list[str]:
    """Problems in a {package: version or None} mapping, each naming the packages and versions involved."""
    problems = [f"{name} is not installed; {FIX}" for name, v in versions.items() if v is None]
    for a, b in PAIRED:
        va, vb = versions.get(a), versions.get(b)
        if va and vb and _base(va) != _base(vb):
            problems.append(
                f"{b} {vb} does not match {a} {va}: {b}'s native library is built for {a} {_base(vb)} "
                f"and fails to load beside {a} {_base(va)}; {FIX}"
            )
    return problems


def import_problems(versions: dict[str, str | None]) -> list[str]:
    """Import the stack as the pipeline does; an import that fails is named with the pair's versions."""
    problems = []
    for module in ("torch", "torchaudio", "transformers", "pyarrow", "av"):
        try:
            __import__(module)
        except Exception as exc:  # the import error text names the symbol; the versions name the cause
            pair = ", ".join(f"{n} {versions.get(n)}" for pair in PAIRED for n in pair)
            problems.append(
                f"import {module} failed ({type(exc).__name__}: {str(exc)[:300]}) with {pair}; {FIX}"
            )
            break
    return problems


def check() -> list[str]:
    versions = installed_versions()
    return mismatches(versions) or import_problems(versions)


def main() -> int:
    problems = check()
    if problems:
        for p in problems:
            print(f"mert-pipeline stack: {p}", file=sys.stderr)
        return 1
    versions = installed_versions()
    print("stack ok: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
