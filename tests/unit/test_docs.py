"""The module reference in docs/ is generated from the modules' own documentation: keep it current."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_module_reference_is_current():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_module_docs.py"), "--check"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
