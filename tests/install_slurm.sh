#!/usr/bin/env bash
# Install Debian's Slurm (slurmctld, slurmd, slurm-client, munge: about 15 s) for the real-Slurm
# test tier (tests/test_slurm_real.py, tests/slurm_cluster.py). tests/run.sh calls it; it does
# nothing where Slurm is installed, and says why it cannot where it is not root or has no
# apt-get (that tier is then skipped, with the reason). No daemon is started here.
set -euo pipefail
if command -v slurmctld >/dev/null || [[ -x /usr/sbin/slurmctld ]]; then
    exit 0
fi
if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "install_slurm.sh: not root, or no apt-get: the real-Slurm tests will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
echo "install_slurm.sh: $(/usr/sbin/slurmctld -V) installed" >&2
