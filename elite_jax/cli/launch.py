"""Run a command as N processes of one multi-host JAX run on this machine (what a pod's hosts do, locally).

  elite-launch --processes 2 --devices-per-process 4 -- elite-train --config configs/tiny_stage1.py \
    --workdir runs/mh --config.multihost=True

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES and JAX_PROCESS_ID;
``--devices-per-process K`` gives each K CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=K,
JAX_PLATFORMS=cpu), so a pod's code path (startup, per-host data, global arrays from local data, saves from every
process, a host's death) runs on one CPU. A command that is a .py file runs with this Python. SIGTERM and SIGINT are
passed to every process. The exit code is the first non-zero one of the processes (0 when all succeed).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="elite-launch", description=__doc__.split("\n")[0])
  p.add_argument("--processes", type=int, required=True, help="how many processes (hosts)")
  p.add_argument("--devices-per-process", type=int, help="CPU devices per process (default: the machine's own)")
  p.add_argument("--port", type=int, help="the coordinator's port on 127.0.0.1 (default: a free one)")
  p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
  args = p.parse_args(argv)
  if args.command[:1] == ["--"]:
    args.command = args.command[1:]
  if not args.command:
    p.error("give the command after --")
  if args.processes < 1 or (args.devices_per_process is not None and args.devices_per_process < 1):
    p.error("--processes and --devices-per-process must be >= 1")
  return args


def environment(index: int, processes: int, port: int, devices: int | None) -> dict[str, str]:
  """The environment of process ``index``."""
  env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
             JAX_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
  if devices is not None:
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
  return env


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  command = list(args.command)
  if command[0].endswith(".py"):
    command = [sys.executable] + command
  port = args.port or free_port()
  children = [subprocess.Popen(command, env=environment(i, args.processes, port, args.devices_per_process))
              for i in range(args.processes)]
  print("elite-launch: " + ", ".join(f"process {i} is pid {c.pid}" for i, c in enumerate(children)),
        file=sys.stderr, flush=True)

  def forward(signum, frame):
    for c in children:
      if c.poll() is None:
        c.send_signal(signum)
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, forward)
  codes: dict[int, int] = {}
  while len(codes) < len(children):
    for i, c in enumerate(children):
      if i not in codes and c.poll() is not None:
        codes[i] = c.returncode
        if c.returncode:
          how = f"signal {-c.returncode}" if c.returncode < 0 else f"exit code {c.returncode}"
          print(f"elite-launch: process {i} ended with {how}", file=sys.stderr, flush=True)
    time.sleep(0.1)
  failed = [codes[i] for i in sorted(codes) if codes[i]]
  return (failed[0] if failed[0] > 0 else 128 - failed[0]) if failed else 0


if __name__ == "__main__":
  sys.exit(main())
