"""A private single-node SLURM cluster for the workflow tests (root only).

``LocalSlurm(workdir).start()`` installs slurm-wlm and munge with apt-get when they are
missing, writes a minimal slurm.conf (state, spool, logs and the munge socket in
``workdir``; also copied to /etc/slurm/slurm.conf because the job-step plugin drops
SLURM_CONF before its inner srun), starts munged, slurmctld and slurmd, and waits until the
node is idle. ``stop()`` sends SIGINT to slurmd and slurmctld (SIGTERM leaves steps behind)
and stops munged, each by the PID it wrote, and restores any previous /etc/slurm/slurm.conf.
There is no slurmdbd: run Snakemake with ``--slurm-status-command squeue`` and
``--slurm-no-account``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ETC_CONF = Path("/etc/slurm/slurm.conf")


class SlurmUnavailable(RuntimeError):
    pass


def _which_all(names) -> bool:
    return all(shutil.which(n) or Path(f"/usr/sbin/{n}").exists() for n in names)


def ensure_installed() -> None:
    if os.geteuid() != 0:
        raise SlurmUnavailable("a private SLURM cluster needs root (munged, slurmctld, slurmd)")
    if _which_all(["slurmctld", "slurmd", "munged", "sbatch", "squeue", "srun"]):
        return
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm is not installed and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], capture_output=True, text=True,
                          env=env, timeout=900)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        proc = subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], capture_output=True,
                              text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise SlurmUnavailable(f"apt-get install slurm-wlm munge failed: {proc.stderr.strip()[-300:]}")


class LocalSlurm:
    def __init__(self, workdir: Path, cpus: int | None = None, mem_mb: int = 16000):
        self.dir = Path(workdir)
        self.cpus = cpus or max(2, os.cpu_count() or 2)
        self.mem_mb = mem_mb
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.dir / "slurm.conf"
        self._saved_etc = None
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "log", "munge"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "munge", 0o700)
        self.conf.write_text(f"""\
ClusterName=deephemnmatest
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
NodeName={self.host} CPUs={self.cpus} RealMemory={self.mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        ETC_CONF.parent.mkdir(parents=True, exist_ok=True)
        if ETC_CONF.exists():
            self._saved_etc = ETC_CONF.read_bytes()
        shutil.copy(self.conf, ETC_CONF)

    def start(self, timeout: float = 60) -> "LocalSlurm":
        ensure_installed()
        self._write_conf()
        d = self.dir
        munged = shutil.which("munged") or "/usr/sbin/munged"
        subprocess.run([munged, "--force", f"--socket={d}/munge/munge.socket", f"--pid-file={d}/munge/munged.pid",
                        f"--log-file={d}/munge/munged.log", f"--seed-file={d}/munge/seed"], check=True, env=self.env)
        subprocess.run([shutil.which("slurmctld") or "/usr/sbin/slurmctld", "-c"], check=True, env=self.env)
        time.sleep(1)
        subprocess.run([shutil.which("slurmd") or "/usr/sbin/slurmd"], check=True, env=self.env)
        t0 = time.time()
        while time.time() - t0 < timeout:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env).stdout
            if out.strip() in ("idle", "mix", "alloc"):
                return self
            time.sleep(1)
        self.stop()
        raise SlurmUnavailable(f"SLURM node did not become idle within {timeout:.0f} s; see {d}/log")

    def _kill(self, pidfile: Path, sig) -> None:
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)

    def stop(self) -> None:
        d = self.dir
        self._kill(d / "slurmd.pid", signal.SIGINT)
        self._kill(d / "slurmctld.pid", signal.SIGINT)
        self._kill(d / "munge" / "munged.pid", signal.SIGTERM)
        if self._saved_etc is not None:
            ETC_CONF.write_bytes(self._saved_etc)
        elif ETC_CONF.exists():
            ETC_CONF.unlink()

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
