"""Multi-process runs: the `--distributed` flags of `omnidiff train` and `omnidiff generate`, and the start-up.

JAX's multi-controller runtime runs one process per host (or per GPU); every process runs the same program on
its own devices, and `jax.distributed.initialize` joins them into one set of global devices, so a mesh spans
them all. With `--distributed` alone, the coordinator, process count and process id come from the cluster
(SLURM, Cloud TPU, Open MPI, Kubernetes: `jax.distributed.initialize` detects them); `--coordinator-address`,
`--num-processes` and `--process-id` set them by hand. Each flag defaults to an environment variable
(`OMNIDIFF_COORDINATOR_ADDRESS`, `OMNIDIFF_NUM_PROCESSES`, `OMNIDIFF_PROCESS_ID`), which is how
`scripts/launch_local.py` wires the processes it starts; a coordinator address, from either, means a
distributed run.

On CPU, collectives across processes need an implementation: `OMNIDIFF_CPU_COLLECTIVES=gloo` (set by the
launcher) selects gloo before the backend starts.
"""

from __future__ import annotations

import argparse
import os

import jax

COORDINATOR_ENV = "OMNIDIFF_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "OMNIDIFF_NUM_PROCESSES"
PROCESS_ID_ENV = "OMNIDIFF_PROCESS_ID"
CPU_COLLECTIVES_ENV = "OMNIDIFF_CPU_COLLECTIVES"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds --distributed, --coordinator-address, --num-processes and --process-id to a command."""
    group = parser.add_argument_group("multi-process (one process per host; see README 'Scale out')")
    group.add_argument("--distributed", action="store_true",
                       help="join the other processes of the run (jax.distributed.initialize); the settings below "
                       "are detected on SLURM, Cloud TPU, Open MPI and Kubernetes")
    group.add_argument("--coordinator-address",
                       help=f"host:port of process 0 (implies --distributed; default ${COORDINATOR_ENV})")
    group.add_argument("--num-processes", type=int, help=f"processes in the run (default ${NUM_PROCESSES_ENV})")
    group.add_argument("--process-id", type=int, help=f"this process's index, 0..N-1 (default ${PROCESS_ID_ENV})")


def initialize_from_args(args: argparse.Namespace) -> None:
    """Starts the distributed runtime when the flags (or their environment variables) ask for it. Must run before
    anything touches a JAX device."""
    if args.distributed or args.coordinator_address or os.environ.get(COORDINATOR_ENV):
        initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif args.num_processes is not None or args.process_id is not None:
        raise ValueError("--num-processes/--process-id need --distributed or --coordinator-address")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """`jax.distributed.initialize` with the CPU collectives of `$OMNIDIFF_CPU_COLLECTIVES` (e.g. gloo) selected
    first. An argument left None comes from its environment variable, else from the cluster's detection."""
    collectives = os.environ.get(CPU_COLLECTIVES_ENV)
    if collectives:
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    jax.distributed.initialize(coordinator_address or os.environ.get(COORDINATOR_ENV),
                               _int_env(NUM_PROCESSES_ENV) if num_processes is None else num_processes,
                               _int_env(PROCESS_ID_ENV) if process_id is None else process_id)


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {value!r}") from None
