"""A one-node Slurm cluster inside one folder, to run the course's sbatch scripts for real.

    with LocalSlurm(folder) as slurm:                    # munged, slurmctld, slurmd: started, then stopped
        job = slurm.submit("chapters/03_distributed/slurm/pretrain.sbatch", options=["--nodes=1"], env={...})
        slurm.wait_for(job, lambda j: j["JobState"] == "COMPLETED")

The three daemons run in the foreground as children of this process, so they are stopped by
their process ids (SIGTERM, then SIGKILL) when the ``with`` block ends, after every job was
cancelled. Every path they use (configuration, munge key and socket, state, spool, logs, pid
files) lies inside ``folder``; the Slurm commands find the configuration through
``SLURM_CONF`` (:attr:`LocalSlurm.env`). What it needs: root (slurmd starts each job as its
user) and Debian's ``slurm-wlm`` and ``munge`` packages; :func:`missing_requirements` says
which is missing. One node cannot show what only a cluster shows: several hosts, a shared
file system, NCCL over InfiniBand.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

from .launch import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "scontrol", "scancel", "squeue", "srun")


def missing_requirements() -> str | None:
    """Why a local Slurm cannot start here (a sentence), or ``None`` when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a local Slurm needs root (slurmd starts each job as the user who submitted it)"
    absent = [name for name in DAEMONS + COMMANDS if shutil.which(name, path=_sbin_path()) is None]
    if absent:
        return (f"{', '.join(absent)} not found: install Debian's packages with "
                "`apt-get install -y slurm-wlm munge`")
    return None


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def slurm_conf(folder: Path, *, cpus: int, ctld_port: int, slurmd_port: int, host: str) -> str:
    """slurm.conf for one node on this host, every path inside ``folder``, munge reached through our socket.

    The node is named after the host, as on a cluster: a job script resolves its node names
    (``scontrol show hostnames``) to reach the rendezvous on its first node.
    """
    return f"""\
ClusterName=course
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder / "munge.socket"}
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "slurmctld.pid"}
SlurmdPidFile={folder / "slurmd.pid"}
SlurmctldLogFile={folder / "slurmctld.log"}
SlurmdLogFile={folder / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
MinJobAge=600
MailProg=/bin/true
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class LocalSlurm:
    """munged, slurmctld and slurmd for one node, all inside ``folder`` (a context manager)."""

    def __init__(self, folder: str | Path, *, cpus: int | None = None, start_timeout_s: float = 60.0):
        self.folder = Path(folder).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.start_timeout_s = start_timeout_s
        self.daemons: dict[str, subprocess.Popen] = {}
        self.node = socket.gethostname().split(".")[0]

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm's commands: this cluster's configuration, the daemons' folders on PATH."""
        return {**os.environ, "SLURM_CONF": str(self.folder / "slurm.conf"), "PATH": _sbin_path()}

    # ----------------------------------------------------------------------------- start and stop

    def __enter__(self) -> "LocalSlurm":
        reason = missing_requirements()
        if reason:
            raise RuntimeError(reason)
        for sub in ("state", "spool", "munge"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)   # munged refuses a folder others can write to
        (self.folder / "slurm.conf").write_text(slurm_conf(self.folder, cpus=self.cpus, ctld_port=free_port(),
                                                           slurmd_port=free_port(), host=self.node))
        try:
            self._start_munge()
            self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.folder / "slurm.conf")])
            self._start("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.folder / "slurm.conf")])
            self.wait_until(lambda: self._node_state() in ("IDLE", "MIXED", "ALLOCATED"), "the node to come up")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start_munge(self) -> None:
        key = self.folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))   # the secret every host of a real cluster shares
        key.chmod(0o600)
        m = self.folder / "munge"
        self._start("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.folder / 'munge.socket'}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        self.wait_until(lambda: (self.folder / "munge.socket").exists(), "munged's socket")

    def _start(self, name: str, command: list[str]) -> None:
        log = (self.folder / f"{name}.out").open("ab")
        self.daemons[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                              cwd=self.folder)
        log.close()

    def stop(self) -> None:
        """Cancel every job, wait for them to end, then stop the daemons by their pids (newest first)."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=30)
            try:
                self.wait_until(lambda: not self.jobs(), "the cancelled jobs to end", timeout_s=60)
            except TimeoutError:
                pass
        for name in reversed(list(self.daemons)):
            proc = self.daemons.pop(name)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    # ----------------------------------------------------------------------------- jobs

    def command(self, *args: str, timeout_s: float = 60) -> str:
        """Run a Slurm command (``scontrol``, ``sbatch``, ...) against this cluster and return its output."""
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def submit(self, script: str | Path, *, args: Sequence[str] = (), options: Sequence[str] = (),
               env: dict[str, str] | None = None, cwd: str | Path | None = None) -> int:
        """``sbatch OPTIONS SCRIPT ARGS`` from ``cwd``, with ``env`` added to the job's environment; the job id.

        Options on the command line override the script's ``#SBATCH`` lines, as on any cluster.
        """
        done = subprocess.run(["sbatch", "--parsable", *options, str(script), *args], env={**self.env, **(env or {})},
                              cwd=cwd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch refused {script}: {done.stderr.strip()}")
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ``StdOut``, ...)."""
        line = self.command("scontrol", "show", "job", "--oneliner", str(job_id))
        return dict(field.split("=", 1) for field in line.split() if "=" in field)

    def jobs(self) -> list[str]:
        """The ids of the jobs not yet finished."""
        return self.command("squeue", "--noheader", "--format=%i").split()

    def wait_for(self, job_id: int, ready: Callable[[dict], bool], what: str = "the job",
                 timeout_s: float = 300) -> dict[str, str]:
        """Poll the job until ``ready(job)``; a job that ends otherwise is an error naming its state."""
        ended = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
        found: dict[str, str] = {}

        def check() -> bool:
            nonlocal found
            found = self.job(job_id)
            if found.get("JobState") in ended and not ready(found):
                raise RuntimeError(f"job {job_id} ended {found['JobState']} (exit {found.get('ExitCode')}) before "
                                   f"{what}; its output: {found.get('StdOut')}")
            return ready(found)
        self.wait_until(check, what, timeout_s=timeout_s)
        return found

    def wait_until(self, condition: Callable[[], bool], what: str, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.start_timeout_s)
        while not condition():
            for name, proc in self.daemons.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}; its log: "
                                       f"{self.folder / (name + '.out')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout_s or self.start_timeout_s:.0f} s for {what}; logs in {self.folder}")
            time.sleep(0.1)

    def _node_state(self) -> str:
        try:
            line = self.command("scontrol", "show", "node", "--oneliner", self.node, timeout_s=10)
        except (RuntimeError, subprocess.TimeoutExpired):
            return ""
        state = dict(f.split("=", 1) for f in line.split() if "=" in f).get("State", "")
        return state.split("+")[0]
