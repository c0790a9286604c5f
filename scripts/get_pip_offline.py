"""Offline stand-in for ansible-test's downloaded get-pip.py bootstrap script.

ansible-test creates an empty venv per sanity test and bootstraps pip with a script it downloads
from a host this machine cannot reach. This script does the same from the standard library's
bundled pip (ensurepip), then lets that pip install the requested packages from PyPI.
scripts/setup.sh copies it into ansible-test's cache under the name ansible-test looks for.
"""
import ensurepip
import subprocess
import sys

ensurepip.bootstrap(upgrade=True)
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
subprocess.check_call([sys.executable, "-m", "pip", "install"] + args)
