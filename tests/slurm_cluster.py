"""A real Slurm 22.05 cluster on this host: munged, slurmctld and two slurmd "nodes", as root.

    with SlurmCluster() as cluster:                 # installs Debian's packages when missing
        subprocess.run(["sbatch", "--wait", "-N", "2", "job.sh"], env=cluster.env(), check=True)

    python -m tests.slurm_cluster up | down | status   # the same by hand, for debugging

Everything listens on 127.0.0.1 only; munged runs with its own key and socket. The nodes
(`node1`, `node2`) are two slurmd daemons on this one host (`slurmd -N nodeK`, distinct
ports), named in /etc/hosts. `ProctrackType=proctrack/linuxproc` and `TaskPlugin=task/none`
because cgroups are not usable here (facts in /work/shared/VERIFIED_FACTS.md). Teardown
cancels the jobs, stops the daemons by PID, and puts /etc/hosts and /etc/slurm/slurm.conf
back as they were. Only one such cluster runs at a time (a state file is the lock).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
STATE_FILE = "/tmp/ilvr-slurm-cluster.json"  # the lock, and what `down` needs
HOSTS = "/etc/hosts"
SLURM_CONF_LINK = "/etc/slurm/slurm.conf"
HOSTS_MARK = "# ilvr-test-slurm-cluster"


class ClusterUnavailable(RuntimeError):
    """This machine cannot run the test cluster (not root, or the packages cannot be installed)."""


def _which_missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


def ensure_installed() -> None:
    """apt-get install Debian's Slurm packages, only if a binary is missing (needs root)."""
    if not _which_missing():
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"Slurm binaries missing ({', '.join(_which_missing())}) and not root to install")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:  # stale package lists: update once and retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0 or _which_missing():
        raise ClusterUnavailable(f"apt-get could not install {' '.join(PACKAGES)}: {res.stderr[-800:]}")


def _free_port_block(n: int) -> int:
    """A base port b with b..b+n-1 all free on 127.0.0.1 (Slurm wants the node ports as one range)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65000:
            continue
        try:
            for p in range(base, base + n):
                with socket.socket() as t:
                    t.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free ports found")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop(pid: int, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; reaps it when it is our child."""
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _stepd_pids() -> set[int]:
    """PIDs of slurmstepd processes (they detach from slurmd, so they are found by name)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"slurmstepd"):
                        pids.add(int(entry))
            except OSError:
                pass
    return pids


def slurm_conf(work: str, nodes: int, cpus: int, ctld_port: int, node_port: int, min_job_age: int) -> str:
    last = f"{node_port}-{node_port + nodes - 1}" if nodes > 1 else str(node_port)
    return f"""# written by tests/slurm_cluster.py
ClusterName=ilvrtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={work}/munge/munge.socket,cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge={min_job_age}
SchedulerParameters=bf_interval=2,sched_interval=2
KillWait=30
MailProg=/bin/true
StateSaveLocation={work}/state
SlurmdSpoolDir={work}/spool/%n
SlurmctldPidFile={work}/slurmctld.pid
SlurmdPidFile={work}/slurmd-%n.pid
SlurmctldLogFile={work}/log/slurmctld.log
SlurmdLogFile={work}/log/slurmd-%n.log
NodeName=node[1-{nodes}] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{last}] CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """Context manager: a running cluster on enter, nothing left (daemons, hosts lines, conf link) on exit."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, min_job_age: int = 30, lock_wait_s: float = 900):
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus_per_node
        self.min_job_age = min_job_age
        self.lock_wait_s = lock_wait_s
        self.state: dict = {}

    # ------------------------------------------------------------------ public
    @property
    def conf(self) -> str:
        return os.path.join(self.state["work"], "slurm.conf")

    def env(self, base: "dict | None" = None) -> dict:
        """An environment for Slurm clients (sbatch, squeue, ...) of this cluster."""
        return dict(os.environ if base is None else base, SLURM_CONF=self.conf)

    def run(self, *cmd: str, check: bool = True) -> str:
        res = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def logs(self, tail: int = 30) -> str:
        """The last lines of every daemon log (for failure messages)."""
        out = []
        log_dir = os.path.join(self.state.get("work", "/nonexistent"), "log")
        for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
            with open(os.path.join(log_dir, name), errors="replace") as f:
                out.append(f"--- {name}\n" + "".join(f.readlines()[-tail:]))
        return "\n".join(out)

    def __enter__(self) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise ClusterUnavailable("the test cluster runs its daemons as root; run the tests as root")
        ensure_installed()
        self._lock()
        try:
            self._start()
        except BaseException:
            _teardown(self.state)  # whatever started, and the state file (the lock)
            self.state = {}
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    # ------------------------------------------------------------------ lock and state
    def _lock(self) -> None:
        """Create the state file exclusively. Another session's live cluster: wait for it; a cluster whose
        session died (or a half-written state): tear it down; a cluster brought up by hand: refuse."""
        deadline = time.time() + self.lock_wait_s
        while True:
            try:
                os.close(os.open(STATE_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                return
            except FileExistsError:
                other = _read_state()
            live = any(_alive(p) for p in other.get("pids", {}).values())
            owner = other.get("owner")
            if live and owner is None and other.get("work"):
                raise RuntimeError(f"a test Slurm cluster brought up by hand is running ({STATE_FILE}); "
                                   "stop it first: python -m tests.slurm_cluster down")
            starting = not other and time.time() - os.path.getmtime(STATE_FILE) < 60
            if not starting and not (live and owner and _alive(owner)):
                _teardown(other)  # leftovers of a session that died (removes the state file)
                continue
            if time.time() > deadline:
                raise RuntimeError(f"another test session's Slurm cluster is still up after {self.lock_wait_s:.0f} s "
                                   f"({STATE_FILE}, pid {owner})")
            time.sleep(2)

    def _save(self) -> None:
        tmp = STATE_FILE + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1)
        os.replace(tmp, STATE_FILE)

    # ------------------------------------------------------------------ bring-up
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(os.path.join(self.state["work"], "log", f"{name}.out"), "ab")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # survives Ctrl-C of the test run; stopped by PID
        log.close()
        self.state["pids"][name] = proc.pid
        self._save()

    def _start(self) -> None:
        work = tempfile.mkdtemp(prefix="ilvr-slurm-")
        self.state = {"work": work, "owner": os.getpid(), "pids": {}, "stepds_before": sorted(_stepd_pids())}
        for sub in ("munge", "state", "log", *(f"spool/{n}" for n in self.nodes)):
            os.makedirs(os.path.join(work, sub), mode=0o700)
        self._save()
        self._start_munge(os.path.join(work, "munge"))
        ctld_port, node_port = _free_port_block(1), _free_port_block(len(self.nodes))
        with open(self.conf, "w") as f:
            f.write(slurm_conf(work, len(self.nodes), self.cpus, ctld_port, node_port, self.min_job_age))
        self._patch_system_files()
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", self.conf])
        self._wait(lambda: self.run("scontrol", "ping", check=False).count("UP") > 0, "slurmctld to answer")
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-f", self.conf, "-N", node])
        self._wait(self._nodes_idle, "both nodes to be idle")

    def _start_munge(self, d: str) -> None:
        key = os.path.join(d, "munge.key")
        fd = os.open(key, os.O_CREAT | os.O_WRONLY, 0o400)  # munged refuses group/world-readable keys
        os.write(fd, os.urandom(1024))
        os.close(fd)
        sock = os.path.join(d, "munge.socket")
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed",
                               f"--log-file={self.state['work']}/log/munged.log"])
        self._wait(lambda: os.path.exists(sock), "munged's socket")

    def _patch_system_files(self) -> None:
        """Name the nodes in /etc/hosts and link the config where the clients look for it."""
        with open(HOSTS) as f:
            hosts = f.read()
        with open(HOSTS, "a") as f:
            f.write(("" if hosts.endswith("\n") or not hosts else "\n") +
                    f"127.0.0.1 {' '.join(self.nodes)} {HOSTS_MARK}\n")
        self.state["hosts_patched"] = True
        os.makedirs(os.path.dirname(SLURM_CONF_LINK), exist_ok=True)
        if os.path.lexists(SLURM_CONF_LINK):
            backup = SLURM_CONF_LINK + f".ilvr-backup-{os.getpid()}"
            os.rename(SLURM_CONF_LINK, backup)
            self.state["conf_backup"] = backup
        os.symlink(self.conf, SLURM_CONF_LINK)
        self.state["conf_link"] = self.conf
        self._save()

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.nodes)

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not ready():
            dead = [n for n, p in self.state["pids"].items() if not _alive(p)]
            if dead or time.time() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"{timeout:.0f} s passed"
                raise RuntimeError(f"test Slurm cluster: waiting for {what}, {why}\n{self.logs()}")
            time.sleep(0.2)

    # ------------------------------------------------------------------ teardown
    def down(self) -> None:
        if self.state:
            _teardown(self.state, env=self.env() if self.state.get("work") else None)
            self.state = {}


def _read_state() -> dict:
    try:
        with open(STATE_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _teardown(state: dict, env: "dict | None" = None) -> None:
    """Cancel jobs, stop the daemons by PID, undo /etc changes, remove the work dir and the state file."""
    pids = state.get("pids", {})
    work = state.get("work")
    if env is None and work:
        env = dict(os.environ, SLURM_CONF=os.path.join(work, "slurm.conf"))
    if env and _alive(pids.get("slurmctld", -1)):
        subprocess.run(["scancel", "--full", "--state=PENDING,RUNNING,SUSPENDED", "--user=root"], env=env,
                       capture_output=True, timeout=30)
        subprocess.run(["scancel", "--user=root"], env=env, capture_output=True, timeout=30)
        deadline = time.time() + 40  # jobs end within KillWait
        while time.time() < deadline:
            q = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T"], env=env, capture_output=True, text=True)
            if q.returncode != 0 or not any(s in q.stdout for s in ("RUNNING", "COMPLETING", "PENDING")):
                break
            time.sleep(0.5)
    for name in sorted(pids, key=lambda n: ("slurmd" not in n, n == "munged")):  # slurmd, slurmctld, munged
        _stop(pids[name])
    for pid in _stepd_pids() - set(state.get("stepds_before", [])):  # steps that outlived their slurmd
        _stop(pid, timeout=5)
    _restore_system_files(state)
    if work and os.path.isdir(work):
        shutil.rmtree(work, ignore_errors=True)
    try:
        os.remove(STATE_FILE)
    except FileNotFoundError:
        pass


def _restore_system_files(state: dict) -> None:
    if state.get("hosts_patched"):
        with open(HOSTS) as f:
            lines = f.readlines()
        kept = [line for line in lines if HOSTS_MARK not in line]
        if kept != lines:
            with open(HOSTS, "w") as f:  # in place: /etc/hosts may be a bind mount
                f.writelines(kept)
    link = state.get("conf_link")
    if link and os.path.islink(SLURM_CONF_LINK) and os.readlink(SLURM_CONF_LINK) == link:
        os.remove(SLURM_CONF_LINK)
    backup = state.get("conf_backup")
    if backup and os.path.lexists(backup) and not os.path.lexists(SLURM_CONF_LINK):
        os.rename(backup, SLURM_CONF_LINK)


def main(argv: "list[str]") -> int:
    what = argv[0] if argv else "status"
    if what == "up":
        cluster = SlurmCluster()
        cluster.__enter__()
        cluster.state["owner"] = None  # outlives this process: only `down` stops it
        cluster._save()
        print(f"up: export SLURM_CONF={cluster.conf}   (stop: python -m tests.slurm_cluster down)")
        print(cluster.run("sinfo"))
    elif what == "down":
        state = _read_state()
        _teardown(state)
        print("down" if state else f"no cluster recorded in {STATE_FILE}")
    elif what == "status":
        state = _read_state()
        if not state:
            print("no test cluster")
            return 1
        print(json.dumps(state, indent=1))
        alive = {n: _alive(p) for n, p in state.get("pids", {}).items()}
        print("daemons alive:", alive)
    else:
        print("usage: python -m tests.slurm_cluster up|down|status", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
