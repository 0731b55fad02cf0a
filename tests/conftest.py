import os
import sys

# Test helpers (gpt_tiny.py, ...) are imported by name, also in the ranks' child processes.
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # pretrain_mixtral.py
