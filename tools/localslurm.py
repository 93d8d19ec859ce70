"""A throwaway one-node SLURM cluster in a directory: munged, slurmctld and slurmd with a generated
slurm.conf, plus job accounting (slurmdbd on a private MariaDB) so `sacct` answers, as on a real
cluster. For tests, and for trying `hydra/launcher=slurm` on a workstation (from the checkout:
it starts root daemons, so it lives beside the package, not in it):

    python -m tools.localslurm [--dir DIR]   # start; prints the SLURM_CONF to export; Ctrl-C stops

Needs root (slurmd starts jobs as their owner) and Debian's packages
`apt-get install -y slurm-wlm munge slurmdbd mariadb-server` (without the last two it runs with
accounting disabled: `sacct` then fails, and submitit logs that on every poll of its jobs).
Everything lives under DIR: its own munge key and socket, free TCP ports, database, state, spool
and logs, so it disturbs no other SLURM, munge or MariaDB on the machine. Client commands (sbatch,
squeue, sacct, scontrol, and submitit through them) find it via SLURM_CONF.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")  # in start order
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")
ACCOUNTING = ("mariadb-install-db", "mariadbd", "mariadb-admin", "slurmdbd", "sacct", "sacctmgr")
PARTITION = "debug"
CRED_EXPIRE_S = 20  # job launch credentials' lifetime: long enough for a busy machine's step start


def _which(name: str) -> Optional[str]:
    # the daemons live in /usr/sbin, which a non-login PATH may lack
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def unavailable_reason() -> Optional[str]:
    """Why a local cluster cannot start here (None if it can try)."""
    missing = [name for name in ("munged", "slurmctld", "slurmd") + CLIENTS if not _which(name)]
    if missing:
        return (f"SLURM/munge programs not found: {', '.join(missing)} "
                "(apt-get install -y slurm-wlm munge)")
    if os.geteuid() != 0:
        return "a local SLURM needs root (slurmd runs jobs as their owner)"
    return None


def accounting_unavailable_reason() -> Optional[str]:
    missing = [name for name in ACCOUNTING if _which(name) is None]
    if missing:
        return (f"no job accounting: {', '.join(missing)} not found "
                "(apt-get install -y slurmdbd mariadb-server)")
    return None


def _free_ports(n: int) -> list[int]:
    """n distinct TCP ports free right now (all held open until all are chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class LocalSlurm:
    """One node (this host) with `cpus` CPUs in partition `debug`; use as a context manager.

    accounting: True runs slurmdbd + MariaDB (an error if they are missing), False runs without,
    None (default) uses them where installed. `env` holds the variables client commands need
    (SLURM_CONF); `start()` sets them in os.environ too, so submitit in this process and its
    children talk to this cluster."""

    def __init__(self, root: Path, cpus: Optional[int] = None, memory_mb: Optional[int] = None,
                 accounting: Optional[bool] = None, start_timeout_s: float = 90):
        self.root = Path(root).resolve()
        # slurmd drains a node that claims more CPUs or memory than the machine has
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb or int(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8) // 2**20
        self.start_timeout_s = start_timeout_s
        self.accounting = accounting_unavailable_reason() is None if accounting is None \
            else accounting
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.ports = dict(zip(("mariadb", "slurmdbd", "slurmctld", "slurmd"), _free_ports(4)))
        self._procs: dict[str, subprocess.Popen] = {}
        self._old_env: dict[str, Optional[str]] = {}

    # --- configuration -------------------------------------------------------------------------
    def _write_munge_key(self) -> Path:
        key = self.root / "munge" / "munge.key"
        key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)  # munged refuses a key others can read
        return key

    def _common(self) -> dict:
        return {"AuthType": "auth/munge", "AuthInfo": f"socket={self.root / 'munge' / 'socket'}",
                "SlurmUser": "root"}

    def slurm_conf_text(self) -> str:
        r = self.root
        conf = {
            "ClusterName": "cnexp-local",
            "SlurmctldHost": f"{self.node}(127.0.0.1)",  # the host name need not resolve
            **self._common(),
            # a requeued job waits cred_expire + 1 s before it may start again (default 120)
            "AuthInfo": f"socket={self.root / 'munge' / 'socket'},cred_expire={CRED_EXPIRE_S}",
            "CredType": "cred/munge",
            "SlurmctldPort": self.ports["slurmctld"],
            "SlurmdPort": self.ports["slurmd"],
            "StateSaveLocation": r / "state",
            "SlurmdSpoolDir": r / "spool",
            "SlurmctldPidFile": r / "slurmctld.pid",
            "SlurmdPidFile": r / "slurmd.pid",
            "ProctrackType": "proctrack/linuxproc",  # no cgroups in a container
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            # look at pending jobs every few seconds (default 60): a requeued job restarts soon
            "SchedulerParameters": "sched_interval=5,bf_interval=5",
            "MpiDefault": "none",
            "ReturnToService": 2,
            "MailProg": "/bin/true",
            "MinJobAge": 300,  # finished jobs stay visible to squeue/scontrol for 5 min
            "KillWait": 10,
        }
        if self.accounting:  # what `sacct` (and so submitit's job watcher) reads
            conf.update({"AccountingStorageType": "accounting_storage/slurmdbd",
                         "AccountingStorageHost": "127.0.0.1",
                         "AccountingStoragePort": self.ports["slurmdbd"],
                         # for slurmdbd connections this names the munge socket, not a password
                         "AccountingStoragePass": self.root / "munge" / "socket",
                         "JobAcctGatherType": "jobacct_gather/linux",
                         "JobAcctGatherFrequency": 30})
        text = "".join(f"{key}={value}\n" for key, value in conf.items())
        text += (f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} "
                 f"RealMemory={self.memory_mb} State=UNKNOWN\n")
        text += f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE\n"
        return text

    def slurmdbd_conf_text(self) -> str:
        conf = {**self._common(), "DbdHost": self.node, "DbdAddr": "127.0.0.1",
                "DbdPort": self.ports["slurmdbd"], "PidFile": self.root / "slurmdbd.pid",
                "StorageType": "accounting_storage/mysql",
                "StorageHost": "127.0.0.1", "StoragePort": self.ports["mariadb"],
                "StorageUser": "root", "StorageLoc": "slurm_acct_db"}
        return "".join(f"{key}={value}\n" for key, value in conf.items())

    # --- processes -----------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.root / "log" / f"{name}.log", "ab") as log:  # -D / --foreground: stderr
            self._procs[name] = subprocess.Popen(
                [_which(name), *args], stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env}, start_new_session=True)  # Ctrl-C is ours

    def _wait(self, what: str, ready) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not ready():
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for "
                                       f"{what}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {self.start_timeout_s:.0f}s waiting for "
                                   f"{what}\n{self.logs()}")
            time.sleep(0.3)

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """A client command against this cluster, e.g. run("squeue", "-h"); returns stdout."""
        done = subprocess.run([_which(args[0]), *args[1:]], capture_output=True, text=True,
                              env={**os.environ, **self.env}, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done.stdout

    def _answers(self, *args: str) -> bool:
        try:
            return subprocess.run([_which(args[0]), *args[1:]], capture_output=True,
                                  env={**os.environ, **self.env}, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def node_state(self) -> str:
        try:
            return self.run("sinfo", "-h", "-n", self.node, "-o", "%t", check=False).strip()
        except subprocess.TimeoutExpired:
            return ""

    def _start_munge(self) -> None:
        munge, key = self.root / "munge", self._write_munge_key()
        self._spawn("munged", ["--foreground", "--force", f"--socket={munge / 'socket'}",
                               f"--key-file={key}", f"--pid-file={munge / 'munged.pid'}",
                               f"--log-file={munge / 'munged.log'}",
                               f"--seed-file={munge / 'munged.seed'}"])
        self._wait("munged's socket", (munge / "socket").exists)

    def _start_accounting(self) -> None:
        data, port = self.root / "mariadb", str(self.ports["mariadb"])
        # small and quick: slurmdbd logs that a production database would want bigger settings
        server = [f"--datadir={data}", "--user=root", "--innodb-log-file-size=4M",
                  "--innodb-lock-wait-timeout=900"]
        subprocess.run([_which("mariadb-install-db"), "--no-defaults", *server, "--skip-test-db",
                        "--auth-root-authentication-method=normal"],  # root, no password
                       check=True, capture_output=True, timeout=self.start_timeout_s)
        self._spawn("mariadbd", ["--no-defaults", *server, f"--port={port}",
                                 "--bind-address=127.0.0.1", f"--socket={self.root / 'mysql.sock'}",
                                 f"--pid-file={self.root / 'mariadbd.pid'}", "--skip-log-bin"])
        self._wait("MariaDB", lambda: self._answers("mariadb-admin", "--no-defaults", "-uroot",
                                                    "-h127.0.0.1", f"-P{port}", "ping"))
        dbd_conf = self.root / "slurmdbd.conf"  # found next to SLURM_CONF
        dbd_conf.write_text(self.slurmdbd_conf_text())
        dbd_conf.chmod(0o600)  # slurmdbd insists: it may hold a database password
        self._spawn("slurmdbd", ["-D"])
        self._wait("slurmdbd", lambda: self._answers("sacctmgr", "-n", "list", "cluster"))

    def start(self) -> "LocalSlurm":
        reason = unavailable_reason() or (self.accounting and accounting_unavailable_reason())
        if reason:
            raise RuntimeError(reason)
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.slurm_conf_text())
        self._old_env = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        try:
            self._start_munge()
            if self.accounting:
                self._start_accounting()
            self._spawn("slurmctld", ["-D", "-i"])
            self._spawn("slurmd", ["-D"])
            self._wait(f"node {self.node} to be idle", lambda: self.node_state() == "idle")
        except BaseException:
            self.stop()
            raise
        return self

    def cancel_all(self, timeout_s: float = 60) -> None:
        """Cancel every job and wait until none runs (their processes belong to slurmd)."""
        if self._procs.get("slurmctld") is None or self._procs["slurmctld"].poll() is not None:
            return
        self.run("scancel", "--partition", PARTITION, check=False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-t", "RUNNING,COMPLETING", check=False).strip():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        try:
            self.cancel_all()
        except (RuntimeError, subprocess.TimeoutExpired):
            pass  # stopping anyway
        for name in reversed(DAEMONS):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for key, value in self._old_env.items():  # the client variables as they were
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._old_env = {}

    def logs(self, tail: int = 15) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # `kill <pid>` stops the cluster as Ctrl-C does


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="where config, state and logs go "
                        "(default: a new temporary directory)")
    parser.add_argument("--cpus", type=int, help="CPUs of the node (default: all)")
    args = parser.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="cnexp-slurm-"))
    signal.signal(signal.SIGTERM, _interrupt)
    with LocalSlurm(root, cpus=args.cpus) as cluster:
        accounting = "with" if cluster.accounting else "WITHOUT"
        print(f"local SLURM up: node {cluster.node} ({cluster.cpus} CPUs), partition {PARTITION}, "
              f"{accounting} job accounting; logs in {root / 'log'}")
        print(f"in another shell:  export SLURM_CONF={cluster.conf}")
        print("Ctrl-C cancels its jobs and stops it.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            print("stopping")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
