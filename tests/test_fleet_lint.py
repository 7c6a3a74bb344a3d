"""The fleet tree passes ansible-lint (production profile) and a syntax check.

No root and no test hosts needed: this runs wherever requirements-fleet.txt is
installed (``make fleet-lint`` runs the same lint).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(600)]

REPO_ROOT = Path(__file__).resolve().parents[1]
FLEET = REPO_ROOT / "fleet"
BIN = Path(sys.executable).parent
PLAYBOOKS = sorted(p.name for p in (FLEET / "playbooks").glob("*.yml"))


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if not path:
        if os.environ.get("HONGBAO_FLEET_REQUIRED") == "1":
            pytest.fail(f"{name} missing: pip install -r requirements-fleet.txt")
        pytest.skip(f"{name} not installed (requirements-fleet.txt)")
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ANSIBLE_CONFIG=str(FLEET / "ansible.cfg"), ANSIBLE_HOME=str(tmp_path / "home"),
               ANSIBLE_NOCOLOR="1", NO_COLOR="1",
               PATH=str(BIN) + os.pathsep + env.get("PATH", ""))
    return env


def test_ansible_lint_production_profile(tmp_path):
    lint = _tool("ansible-lint")
    result = subprocess.run([lint, "--nocolor"], cwd=FLEET, env=_env(tmp_path),
                            capture_output=True, text=True, timeout=500)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert "Passed" in output or "passed" in output, output[-2000:]


def test_playbooks_syntax(tmp_path):
    """Every playbook against the production inventory (one run: ~4 s, not 4 s each)."""
    ansible_playbook = _tool("ansible-playbook")
    result = subprocess.run(
        [ansible_playbook, "--syntax-check", "-i", "inventory/production",
         *(f"playbooks/{p}" for p in PLAYBOOKS)],
        cwd=FLEET, env=_env(tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(PLAYBOOKS) >= 7
