import os
import sys

# Spawned ranks import test workers from this folder.
sys.path.insert(0, os.path.dirname(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (os.path.dirname(__file__), os.environ.get("PYTHONPATH")) if p
)
