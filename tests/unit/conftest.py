import sys
from pathlib import Path

# Make `ansible_collections.kldload.netstack` importable from the repository checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / ".collections"))
