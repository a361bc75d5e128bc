"""A real two-node Slurm cluster on localhost for the tests (Debian 12's slurm-wlm 22.05).

munged, slurmctld and two slurmd (`-N n1`, `-N n2`: Debian's build supports several slurmd per host, one port
each) run with a configuration in a temporary directory; every address is 127.0.0.1, and clients find the
configuration through SLURM_CONF, so nothing is looked up or sent off the machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

NODES = {"n1": 6818, "n2": 6819}
CTLD_PORT = 6817

CONF = """\
ClusterName=dpotest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Process tracking and task plugins that need no cgroups (none here).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=20
MinJobAge=600
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


class SlurmUnavailable(RuntimeError):
    pass


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                                                       timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class SlurmCluster:
    """Starts the daemons (`start`), runs clients against them (`run`, `sbatch`, `wait`), stops what it started."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    # -------------------------------------------------------------------------------------------- daemons
    def start(self) -> None:
        missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if not shutil.which(b)]
        if missing:
            raise SlurmUnavailable(f"not installed: {', '.join(missing)} (Debian: apt-get install munge slurmctld "
                                   "slurmd slurm-client)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmd needs root")
        for port in (CTLD_PORT, *NODES.values()):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    raise SlurmUnavailable(f"port {port} on 127.0.0.1 is taken (another Slurm running?)")
        if not _munge_works():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            self._spawn(["setpriv", "--reuid=munge", "--regid=munge", "--init-groups", "/usr/sbin/munged", "-F"],
                        "munged")
            self._until(_munge_works, 10, "munged did not start")
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        nodes = "\n".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2 "
                          "State=UNKNOWN" for name, port in NODES.items())
        self.conf.write_text(CONF.format(d=self.root, ctld_port=CTLD_PORT, nodes=nodes, node_names=",".join(NODES)))
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for name in NODES:
            self._spawn(["slurmd", "-D", "-N", name, "-f", str(self.conf)], f"slurmd-{name}")
        self._until(self._nodes_idle, 60, "the nodes did not become idle")

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / f"{name}.stdout", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _nodes_idle(self) -> bool:
        for proc in self.procs:
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{proc.args[0]} exited ({proc.returncode}); logs in {self.root}")
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(name) == "idle" for name in NODES)

    @staticmethod
    def _until(predicate, timeout: float, message: str, interval: float = 0.3):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise SlurmUnavailable(message)

    def stop(self) -> None:
        for proc in reversed(self.procs):  # slurmd first, then slurmctld, then munged (if we started it)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = []

    # -------------------------------------------------------------------------------------------- clients
    def run(self, cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=kwargs.pop("env", self.env), capture_output=True, text=True, timeout=60,
                              **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, args: list[str], env: dict | None = None, cwd=None) -> int:
        out = self.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait(self, job_id: int, timeout: float = 300) -> dict[str, str]:
        """Waits until the job has ended (any final state); returns its record."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                 "DEADLINE", "PREEMPTED"}
        return self._until(lambda: (j := self.job(job_id))["JobState"] in final and j, timeout,
                           f"job {job_id} did not end within {timeout} s: {self.job(job_id)}", interval=1)
