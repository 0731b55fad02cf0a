"""Cluster recipes (``examples/*.sh``): bash files of Megatron-LM-style flag arrays.

A recipe sets ``NODES``, ``GPUS_PER_NODE``, flag arrays (``MODEL_ARGS``, ``MOE_ARGS``,
``PARALLEL_ARGS``, ...) and ``ARG_GROUPS``, the names of those arrays in command-line order. The
Slurm launcher sources it and passes the arrays named in ``ARG_GROUPS`` to ``pretrain_mixtral.py``;
``load`` reads it the same way (by sourcing it in bash, so a recipe may use ``${VAR:-default}``).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from megatron_ext.arguments import build_parser

# Print NODES, GPUS_PER_NODE, then each array named in ARG_GROUPS as: name, length, elements
# (NUL separated, so any flag value survives).
_DUMP = r"""
set -euo pipefail
source "$1"
printf '%s\0' "${NODES:?the recipe must set NODES}" "${GPUS_PER_NODE:-8}"
for g in "${ARG_GROUPS[@]:?the recipe must list its flag arrays in ARG_GROUPS}"; do
    declare -n arr="$g"
    printf '%s\0%s\0' "$g" "${#arr[@]}"
    if (( ${#arr[@]} )); then printf '%s\0' "${arr[@]}"; fi
    unset -n arr
done
"""


@dataclass
class Recipe:
    path: str
    nodes: int
    gpus_per_node: int
    groups: dict[str, list[str]]

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def argv(self) -> list[str]:
        return [a for flags in self.groups.values() for a in flags]


def load(path: str, env: dict | None = None) -> Recipe:
    """Source ``path`` in bash and return its layout and flag groups."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no recipe at {path}")
    proc = subprocess.run(
        ["bash", "-c", _DUMP, "recipe", path],
        capture_output=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if proc.returncode != 0:
        raise ValueError(f"sourcing {path} failed: {proc.stderr.decode().strip()}")
    fields = proc.stdout.decode().split("\0")[:-1]
    nodes, gpus, rest = int(fields[0]), int(fields[1]), fields[2:]
    groups = {}
    while rest:
        name, n = rest[0], int(rest[1])
        groups[name] = rest[2 : 2 + n]
        rest = rest[2 + n :]
    return Recipe(path, nodes, gpus, groups)


def _arity() -> dict[str, object]:
    """Option string -> nargs of ``pretrain_mixtral.py``'s parser (0 for switches)."""
    out = {}
    for action in build_parser()._actions:
        n = 0 if action.nargs == 0 else action.nargs if action.nargs is not None else 1
        for opt in action.option_strings:
            out[opt] = n
    return out


def strip_flags(argv: list[str], drop: set[str]) -> tuple[list[str], list[str]]:
    """Remove the flags in ``drop`` (with their values) from ``argv``; return (kept, removed)."""
    arity = _arity()
    kept, removed, i = [], [], 0
    while i < len(argv):
        flag = argv[i]
        n = arity.get(flag, 0)
        j = i + 1
        if n in ("*", "+"):
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
        elif isinstance(n, int):
            j = i + 1 + n
        (removed if flag in drop else kept).extend(argv[i:j])
        i = j
    return kept, removed
