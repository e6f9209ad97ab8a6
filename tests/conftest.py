import os
import sys

# tests import helpers (naive_microadam, ...) that live beside them
sys.path.insert(0, os.path.dirname(__file__))
