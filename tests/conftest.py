import os
import sys

# Test helpers (gpt_tiny.py, ...) are imported by name, also in the ranks' child processes.
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # pretrain_mixtral.py


TIERS = {  # name -> which test reports belong to it
    "real Slurm": lambda r: "test_slurm_real.py" in r.nodeid,
    "browser (Chromium)": lambda r: "chromium" in r.nodeid,
    "GPU rules": lambda r: "gpu_rules" in r.nodeid,
    "real GPU (-m gpu)": lambda r: "gpu" in getattr(r, "keywords", {}),
}


def pytest_terminal_summary(terminalreporter):
    """One line per service-backed tier, so a CI log shows whether it ran or was skipped."""
    for tier, belongs in TIERS.items():
        counts = {}
        for outcome in ("passed", "failed", "skipped", "error"):
            reports = terminalreporter.stats.get(outcome, [])
            counts[outcome] = sum(1 for r in reports if hasattr(r, "nodeid") and belongs(r))
        if any(counts.values()):
            text = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
            terminalreporter.write_line(f"tier {tier}: {text}")
