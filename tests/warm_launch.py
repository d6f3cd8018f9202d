"""The tests' stand-in for `python -m torch.distributed.run --nproc_per_node=N --master_port=P SCRIPT ARGS`: the
ranks fork from a server that has imported torch, DeepSpeed and transformers once.

Each rank of a training spends ~6 s of CPU importing that stack before it does anything (python -X importtime),
and the suite starts ~70 of them besides ~35 launchers: a third of the suite's CPU on 2 cores. With this
launcher a training's ranks cost their own work only. What a rank sees is what torchrun gives it: a process of its
own (a fork of a server that never ran a test or a torch op), the launcher's working directory, environment and
standard streams, RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT, and the script
run as `__main__`. As with torchrun, the first rank to fail gets the others SIGTERM (SIGKILL 30 s later) and the
launcher exits 1; a signal to the launcher reaches every rank; a launcher that dies takes its ranks with it.

Fresh interpreters stay tested: the quick start, the Slurm tests, the benches, the method table, and the tests
that signal one rank (they find the ranks as the launcher's children: `command(..., launcher="torchrun")`) start
real ones with the real launchers.

    server:   python tests/warm_launch.py serve SOCKET          (tests/conftest.py: one per pytest worker)
    launcher: python tests/warm_launch.py run SOCKET --nproc_per_node=2 --master_port=P SCRIPT ARGS...

The launcher imports nothing but the standard library (~50 ms).
"""
from __future__ import annotations

import io
import json
import os
import select
import signal
import socket
import struct
import sys
import time

# what every rank imports anyway: the stack, what deepspeed.initialize imports lazily (its Muon optimizer module
# pulls in torch._dynamo and functorch: ~1 s), and on rank 0 MLflow's SQL store and matplotlib (the loss curve).
# ilvr.* is left to the ranks: the code under test is read afresh by every launch.
PRELOAD = ["torch", "deepspeed", "transformers", "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
           "transformers.models.qwen2_5_vl.processing_qwen2_5_vl", "safetensors.torch", "mlflow",
           "deepspeed.runtime.zero.muon.muon_optimizer", "mlflow.store.tracking.sqlalchemy_store",
           "matplotlib.backends.backend_agg", "matplotlib.figure"]
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
KILL_AFTER_S = 30  # torchrun's grace between SIGTERM to the surviving ranks and SIGKILL


def _send(conn: socket.socket, obj: dict, fds: "list[int] | None" = None) -> None:
    data = json.dumps(obj).encode()
    msg = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(conn, [msg], fds)
    else:
        conn.sendall(msg)


def _recv(conn: socket.socket, with_fds: int = 0) -> "tuple[dict | None, list[int]]":
    fds: list[int] = []
    if with_fds:
        head, fds, _, _ = socket.recv_fds(conn, 4, with_fds)
    else:
        head = conn.recv(4)
    while head and len(head) < 4:
        more = conn.recv(4 - len(head))
        if not more:
            return None, fds
        head += more
    if not head:
        return None, fds
    (size,) = struct.unpack("!I", head)
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None, fds
        data += chunk
    return json.loads(data), fds


# ----------------------------------------------------------------------------- the server


def serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sessions are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen(64)
    os.rename(path + ".tmp", path)  # ready: the path appears only now
    parent = os.getppid()
    while os.getppid() == parent:  # the pytest worker that started it is alive
        ready, _, _ = select.select([server], [], [], 1.0)
        if not ready:
            continue
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                _session(conn)
            finally:
                os._exit(0)
        conn.close()


def _session(conn: socket.socket) -> None:
    """One launch: fork the ranks, watch them like torchrun, report their exit codes."""
    req, fds = _recv(conn, with_fds=3)
    if req is None:
        return
    n = req["nproc"]
    pids: dict[int, int] = {}
    for rank in range(n):
        pid = os.fork()
        if pid == 0:
            conn.close()
            _rank(req, fds, rank)
        pids[pid] = rank
    for fd in fds:
        os.close(fd)
    codes: dict[int, int] = {}
    failed_at = None
    while len(codes) < n:
        ready, _, _ = select.select([conn], [], [], 0.1)
        if ready:
            msg, _ = _recv(conn)
            if msg is None:  # the launcher is gone (killed by a timeout): so are its ranks
                for pid in pids:
                    if pids[pid] not in codes:
                        _kill(pid, signal.SIGKILL)
                break
            for pid, rank in pids.items():
                if rank not in codes:
                    _kill(pid, msg["signal"])
        for pid, rank in pids.items():
            if rank in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[rank] = os.waitstatus_to_exitcode(status)
                if codes[rank] != 0 and failed_at is None:
                    failed_at = time.monotonic()
                    for other, r in pids.items():
                        if r not in codes:
                            _kill(other, signal.SIGTERM)
        if failed_at is not None and time.monotonic() - failed_at > KILL_AFTER_S:
            for pid, rank in pids.items():
                if rank not in codes:
                    _kill(pid, signal.SIGKILL)
    try:
        _send(conn, {"codes": [codes.get(r) for r in range(n)]})
    except OSError:
        pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _rank(req: dict, fds: list[int], rank: int) -> None:
    """In the forked rank: become `python -u SCRIPT ARGS` started by torchrun, and run."""
    import runpy
    import traceback

    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for sig in (*FORWARDED, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(req["cwd"])
        os.umask(req["umask"])
        os.environ.clear()
        os.environ.update(req["env"])
        n = req["nproc"]
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                          GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(req["master_port"]))
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets it for more than one rank
        import torch  # imported by the server: a fresh interpreter would read OMP_NUM_THREADS at its start

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        # python -u: the streams on the launcher's descriptors, unbuffered as torchrun's ranks write them
        sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                                       errors="backslashreplace", write_through=True)
        sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                                       errors="backslashreplace", write_through=True)
        script = req["script"]
        sys.argv = [script, *req["args"]]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


_server: "tuple | None" = None  # (process, socket path) of this test process's rank server


def server_socket() -> str:
    """The socket of this process's rank server, started on first use (~6 s of imports, once) and ended with
    the process (it also leaves when its parent does)."""
    global _server
    if _server is not None and _server[0].poll() is None:
        return _server[1]
    import atexit
    import subprocess
    import tempfile

    directory = tempfile.mkdtemp(prefix="ilvr-warm-ranks-")
    path = os.path.join(directory, "ranks.sock")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", path], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the rank server did not start (exit {proc.poll()})")
        time.sleep(0.05)

    def stop() -> None:
        proc.kill()
        proc.wait()
        for name in (path, directory):
            try:
                (os.rmdir if name == directory else os.unlink)(name)
            except OSError:
                pass

    atexit.register(stop)
    _server = (proc, path)
    return path


# ----------------------------------------------------------------------------- the launcher


def launch(argv: list[str]) -> int:
    path, rest = argv[0], argv[1:]
    nproc, port = 1, 29500
    while rest and rest[0].startswith("--"):
        key, _, value = rest.pop(0).partition("=")
        if key == "--nproc_per_node":
            nproc = int(value)
        elif key == "--master_port":
            port = int(value)
        else:
            print(f"warm_launch: unknown option {key}", file=sys.stderr)
            return 2
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    umask = os.umask(0)
    os.umask(umask)
    _send(conn, {"nproc": nproc, "master_port": port, "script": rest[0], "args": rest[1:], "cwd": os.getcwd(),
                 "env": dict(os.environ), "umask": umask}, fds=[0, 1, 2])
    for sig in FORWARDED:
        signal.signal(sig, lambda s, _f: _send(conn, {"signal": int(s)}))
    msg, _ = _recv(conn)  # a forwarded signal interrupts nothing: Python retries the read (PEP 475)
    if msg is None:
        print("warm_launch: the rank server went away", file=sys.stderr)
        return 1
    codes = msg["codes"]
    failed = [(r, c) for r, c in enumerate(codes) if c != 0]
    if failed:
        print("warm_launch: " + ", ".join(f"rank {r} exited with {c}" for r, c in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(launch(sys.argv[2:]))
