"""The layers of docs/architecture.md hold: `lint-imports` (import-linter) checks the contracts in
setup.cfg over every import, function-level ones included."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]


def _lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the packages under ``root`` with ``root``'s setup.cfg."""
    env = dict(os.environ, PYTHONPATH=str(root))
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-logo", "--no-cache", "setup.cfg"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_layers_hold():
    run = _lint(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 kept, 0 broken" in run.stdout


@pytest.mark.parametrize("module, line, broken", [
    # a backend reaching up to a command, inside a function (import-linter sees those)
    ("dali_ipmix/fused.py", "def _up():\n    from .debug import _common  # noqa\n",
     "dali_ipmix.fused is not allowed to import dali_ipmix.debug"),
    # a library module reaching the package root, which re-exports the loaders above pipelines
    ("dali_ipmix/readers.py", "def _up():\n    import dali_ipmix  # noqa\n",
     "dali_ipmix.readers is not allowed to import dali_ipmix"),
])
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, broken):
    for name in ("dali_ipmix", "pipelines"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    with open(tmp_path / module, "a") as f:
        f.write("\n\n" + line)
    run = _lint(tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert broken in " ".join(run.stdout.split()), run.stdout
