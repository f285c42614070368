"""The front door: every install command uses the one lock file, the ABI-sensitive packages are pinned exactly in
both places, CI runs the README's test command verbatim, and the stack check names a mismatched pair."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from pipeline import stack

ROOT = Path(__file__).resolve().parent.parent
EXACT = ("torch", "torchaudio", "transformers")


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "infra" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return pins


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [ln.strip() for b in blocks for ln in b.splitlines() if "pip install" in ln]


def test_abi_packages_are_pinned_exactly_and_agree_with_the_lock_file():
    deps = {
        canonicalize_name(Requirement(r).name): Requirement(r)
        for r in _pyproject()["project"]["dependencies"]
    }
    locked = _locked()
    for name in EXACT:
        (spec,) = deps[name].specifier
        assert spec.operator == "==" and "*" not in spec.version, (
            f"{name} must be pinned exactly: {deps[name]}"
        )
        assert Version(spec.version) == Version(locked[name]), (
            f"pyproject {deps[name]} vs lock {locked[name]}"
        )
    assert Version(locked["torch"]).base_version == Version(locked["torchaudio"]).base_version


def test_every_install_command_uses_the_lock_file():
    cmds = _readme_commands()
    assert len(cmds) >= 3, cmds
    for cmd in cmds:
        assert "pip install -c infra/constraints.txt " in cmd, f"README install without the lock file: {cmd}"


def test_ci_runs_the_readme_test_command_verbatim_and_lints():
    readme = (ROOT / "README.md").read_text()
    (test_cmd,) = [c for c in _readme_commands() if "pytest" in c]
    assert "python -m pipeline.stack &&" in test_cmd  # the stack is checked before anything imports it
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, "the README's test command must stand verbatim in .ci/run"
    for step in ("ruff check .", "ruff format --check .", "mypy"):
        assert step in ci, f".ci/run must run {step}"
    assert "ruff format --check" in readme and "mypy" in readme  # the README says how to run them too


def test_stack_check_names_the_mismatched_pair():
    problems = stack.mismatches({"torch": "2.11.0+cu130", "torchaudio": "2.11.1", "transformers": "5.24.0"})
    assert len(problems) == 1
    assert "torchaudio 2.11.1" in problems[0] and "torch 2.11.0+cu130" in problems[0]
    assert "infra/constraints.txt" in problems[0]
    assert stack.mismatches({"torch": "2.11.0+cu130", "torchaudio": "2.11.0+cu130"}) == []
    missing = stack.mismatches({"torch": None, "torchaudio": "2.11.0"})
    assert missing and "torch is not installed" in missing[0]


def test_stack_check_passes_on_this_install():
    r = subprocess.run([sys.executable, "-m", "pipeline.stack"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch 2.11.0" in r.stdout and "torchaudio 2.11.0" in r.stdout
