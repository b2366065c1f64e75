"""Runs one command as N processes of a multi-process JAX run on this machine, each with D CPU devices.

    python scripts/launch_local.py --processes 2 --devices-per-process 4 -- omnidiff train --config C ...
    python scripts/launch_local.py --processes 1 --devices-per-process 8 -- omnidiff train --config C ...

Each process gets `JAX_PLATFORMS=cpu`, `--xla_force_host_platform_device_count=D` in `XLA_FLAGS`, gloo for CPU
collectives, and the coordinator (localhost, a free port), process count and its process id through the
environment variables that `omnidiff_jax.distributed` reads (so `omnidiff train`/`generate` need no flags, and a
Python program calls `omnidiff_jax.distributed.initialize()`). Every output line is prefixed with its
process (`[p0] ...`). As soon as a process exits non-zero the others are ended and the launcher exits with that
status; `--timeout` ends them all (exit 124) when the run takes longer.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

GRACE_S = 2.0  # between SIGTERM and SIGKILL when ending the other processes (JAX catches SIGTERM)
DEVICE_FLAG = "--xla_force_host_platform_device_count"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s --processes N --devices-per-process D [--timeout S] -- CMD ...")
    parser.add_argument("--processes", type=int, required=True, help="processes to start (N)")
    parser.add_argument("--devices-per-process", type=int, required=True, help="CPU devices per process (D)")
    parser.add_argument("--timeout", type=float, help="end every process and exit 124 after this many seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command each process runs, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --, e.g. -- omnidiff train --config configs/train_tiny.py")
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices-per-process must be >= 1")
    address = f"localhost:{free_port()}"
    procs = [start(command, i, args.processes, args.devices_per_process, address) for i in range(args.processes)]
    print(f"launch_local: {address}, " + ", ".join(f"p{i} pid {p.pid}" for i, p in enumerate(procs)), file=sys.stderr,
          flush=True)
    printers = [threading.Thread(target=relay, args=(p, f"[p{i}] "), daemon=True) for i, p in enumerate(procs)]
    for t in printers:
        t.start()
    status = wait(procs, args.timeout)
    for t in printers:
        t.join(timeout=2)
    return status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(command: list[str], index: int, count: int, devices: int, address: str) -> subprocess.Popen:
    """Process `index` of `count`, its output (stdout and stderr) on one pipe."""
    env = dict(os.environ)
    flags = re.sub(rf"{DEVICE_FLAG}=\S*", "", env.get("XLA_FLAGS", "")).split()
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([*flags, f"{DEVICE_FLAG}={devices}"]),
               OMNIDIFF_CPU_COLLECTIVES="gloo", OMNIDIFF_COORDINATOR_ADDRESS=address,
               OMNIDIFF_NUM_PROCESSES=str(count), OMNIDIFF_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def relay(proc: subprocess.Popen, prefix: str) -> None:
    """Copies the process's output to ours, line by line, with `prefix`."""
    for line in iter(proc.stdout.readline, b""):
        sys.stdout.write(prefix + line.decode(errors="replace").rstrip("\r\n") + "\n")
        sys.stdout.flush()


def wait(procs: list[subprocess.Popen], timeout: float | None) -> int:
    """0 once every process exited 0; the first non-zero status (the rest are ended); 124 after `timeout`. Ending
    the launcher (Ctrl-C, SIGTERM, SIGHUP) ends the processes too."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                print(f"launch_local: process {i} exited with status {code}; ending the others", file=sys.stderr)
                return code if code > 0 else 128 - code  # killed by signal s: 128 + s, as a shell says
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(f"launch_local: timed out after {timeout:g} s; ending every process", file=sys.stderr)
                return 124
            time.sleep(0.1)
    except KeyboardInterrupt:
        return 130
    finally:
        end(procs)


def end(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each running process's group, then SIGKILL to those still alive after GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + GRACE_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
