"""A real one-node Slurm (Debian's slurm-wlm 22.05) on this machine, for tests.

``LocalSlurm(workdir).start()`` runs munged, slurmctld and slurmd as foreground daemons under
``workdir`` (no systemd, no cgroups: ``ProctrackType=proctrack/linuxproc``,
``TaskPlugin=task/none``), one node with this machine's CPUs and memory, free ports, a short
``cred_expire`` so a requeued job starts again within seconds, and
``SchedulerParameters=...`` that make scheduling immediate. ``env`` is what a client command
(sbatch, squeue, scontrol, scancel) needs. ``stop()`` ends the daemons and any job step of
theirs by pid (never by name: other Slurms may run on the machine).

``available()`` says why the tier cannot run here, or returns None.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")


def available() -> str | None:
    """None if a local Slurm can run here, else the reason it cannot."""
    missing = [
        d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()
    ]
    if missing:
        return (
            f"Slurm is not installed ({', '.join(missing)} missing): bash tests/install_slurm.sh "
            "(Debian's slurmctld slurmd slurm-client munge; tests/run.sh does it as root)"
        )
    if os.geteuid() != 0:
        return "the local Slurm needs root (slurmd runs jobs as their user)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (Debian's munge package creates it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    """``workdir`` None: a fresh directory under /tmp, removed by ``stop()`` (munged wants every
    directory above its socket searchable by all, which pytest's 0700 tmp_path is not)."""

    def __init__(self, workdir: Path | None = None, cpus: int | None = None, memory_mb=16000):
        self.own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="local-slurm-", dir="/tmp"))
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.dir / "slurm.conf")}

    # ------------------------------------------------------------------------------ start
    def start(self, timeout: float = 60.0) -> LocalSlurm:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        for name, args in (("slurmctld", ["-D", "-i"]), ("slurmd", ["-D"])):
            log = open(self.dir / f"{name}.out", "w")  # noqa: SIM115 (kept open for the daemon)
            self.procs[name] = subprocess.Popen(
                [_bin(name), *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return self
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited: {self.tail(name)}")
            time.sleep(0.3)
        raise RuntimeError(f"the node never became idle ({state!r}): {self.tail('slurmd')}")

    def _start_munge(self) -> None:
        munge = self.dir / "munge"
        munge.mkdir(exist_ok=True)
        munge.chmod(0o711)  # munged: the socket directory must be searchable by all
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        user = pwd.getpwnam("munge")
        for path in (munge, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        self.dir.chmod(0o755)
        self.socket = munge / "munge.socket.2"
        self.procs["munged"] = subprocess.Popen(
            [
                "runuser", "-u", "munge", "--", _bin("munged"), "-F", f"--key-file={key}",
                f"--socket={self.socket}", f"--pid-file={munge}/munged.pid",
                f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("munged did not start")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir(exist_ok=True)
        conf = f"""
ClusterName=t
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
ReturnToService=2
JobRequeue=1
KillWait=60
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=300
NodeName={self.host} CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
        (d / "slurm.conf").write_text(conf.lstrip())

    # ---------------------------------------------------------------------------- clients
    def run(self, *cmd: str, check: bool = True, env=None, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_bin(cmd[0]), *cmd[1:]], env=env or self.env, capture_output=True, text=True,
            check=check, timeout=60, **kw,
        )  # fmt: skip

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def tail(self, name: str, lines: int = 20) -> str:
        for path in (self.dir / f"{name}.log", self.dir / f"{name}.out"):
            if path.exists():
                return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    # ------------------------------------------------------------------------------- stop
    def stop(self) -> None:
        """End every job, then the daemons and their job steps, by pid."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--user", "root", check=False)
        stepds = _descendants(self.procs["slurmd"].pid) if "slurmd" in self.procs else []
        for name in ("slurmd", "slurmctld", "munged"):  # munged: runuser passes TERM on
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for pid in stepds:  # slurmstepd and what it still runs
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out
