"""``spotckpt simulate``: the managed-spot lifecycle, interruption by interruption, on one machine.

What it does::

    Starting     a new "instance": a fresh, EMPTY local checkpoint dir
    Downloading  CMD started in its own process group; it restores the newest checkpoint from S3
    Training     the trainer restored a step or made progress (its events file says so)
    Interrupted  SIGTERM to CMD; SIGKILL to its process group after the grace if it still runs
    (Starting -> Downloading -> Training -> Interrupted)* ...
    Uploading    CMD exited 0: the checkpoints committed in S3 are listed
    Completed
  or Stopping -> MaxWaitTimeExceeded when ``max_wait_seconds`` runs out,
  or Failed when CMD exits non-zero without being interrupted.

CMD's environment: ``SPOTCKPT_LOCAL_DIR`` (the fresh dir), ``SPOTCKPT_S3_URI``
(``s3://<bucket>/<job>``), ``SPOTCKPT_EVENTS_FILE`` (the manager appends its events there as JSON
lines: the simulator follows the trainer through them only, not through its output),
``SPOTCKPT_GRACE_SECONDS`` (``--grace``: the trainer budgets its final save with the grace it
really gets), ``SPOTCKPT_INTERRUPTIONS`` (with ``--interrupt-every``, or ``--interrupt-every-steps``
with ``--step-seconds``: the schedule's rates, as a user would give them to ``AutoInterval``; see
:mod:`.schedule`), ``TRAINING_JOB_NAME``,
``PYTHONUNBUFFERED=1``, with the embedded S3 server ``AWS_ENDPOINT_URL`` and dummy credentials,
and for ``torchrun --nproc_per_node N`` (N > 1) ``OMP_NUM_THREADS=1`` unless it is set
(torchrun's own default, without its banner per start).

The parts, one module each:

- :mod:`.s3env`    where checkpoints go: moto's server embedded on 127.0.0.1, or an endpoint
  from the AWS configuration (``--s3``, ``$AWS_ENDPOINT_URL``); the committed steps at the end
- :mod:`.process`  one run of CMD: process group, output copied, SIGTERM then SIGKILL after the grace
- :mod:`.follow`   the trainer's events file, read incrementally
- :mod:`.schedule` when interruptions happen (always during training; see there)
- :mod:`.summary`  the recorded data and the summary: training and billable seconds, the savings
  with the spot-price assumption, lost work and time to resume per interruption (see there)
- :mod:`.job`      the lifecycle loop that drives them
- :mod:`.plot`     the picture of the job (``--plot FILE.png``)

Exit status: 0 when the final run of CMD exits 0; CMD's status when it fails on its own (1 when it
died of a signal); 3 for ``MaxWaitTimeExceeded``. Bad input (CMD not found, conflicting options)
raises :class:`~spotckpt.errors.ConfigError` before anything starts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
from typing import Any, TextIO

from spotckpt.errors import ConfigError
from spotckpt.tools.simulate.process import host_commands
from spotckpt.tools.simulate.job import EXIT_MAX_WAIT, Simulation
from spotckpt.tools.simulate.schedule import Scheduler
from spotckpt.tools.simulate.summary import format_summary, summary

__all__ = ["simulate", "add_arguments", "main_from_args", "EXIT_MAX_WAIT", "DEFAULT_SPOT_PRICE_RATIO"]

DEFAULT_INTERRUPTIONS = 2
#: Spot price / on-demand price assumed for ``BillableTimeInSeconds``: 0.3 is 70 % off, typical of
#: GPU spot capacity (AWS quotes "up to 90 %").
DEFAULT_SPOT_PRICE_RATIO = 0.3


def _resolve_cmd(cmd: list[str]) -> list[str]:
    if not cmd:
        raise ConfigError("nothing to run: give the training command after '--', e.g. "
                          "spotckpt simulate -- python train.py")
    exe = cmd[0]
    if os.sep in exe:
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise ConfigError(f"command not found or not executable: {exe!r}")
    elif shutil.which(exe) is None:
        raise ConfigError(f"command not found on PATH: {exe!r}; check the command after '--'")
    return list(cmd)


def simulate(
    cmd: list[str],
    *,
    interruptions: int | None = None,
    interrupt_every_seconds: float | None = None,
    total_steps: int | None = None,
    seed: int = 0,
    grace_seconds: float = 10.0,
    max_wait_seconds: float | None = None,
    json_output: bool = False,
    s3_uri: str | None = None,
    restart_delay_seconds: float = 1.0,
    spot_price_ratio: float = DEFAULT_SPOT_PRICE_RATIO,
    hosts: int = 1,
    interrupt_hosts: str = "one",
    plot: str | os.PathLike[str] | None = None,
    hard_kill_fraction: float = 0.0,
    interrupt_every_steps: int | None = None,
    step_seconds: float | None = None,
    stream: TextIO = sys.stdout,
) -> int:
    """Run ``cmd`` through a simulated managed-spot lifecycle; returns the exit status.

    ``total_steps``: the trainer's final step, when known -- interruptions are then placed by step
    inside the run (see :mod:`.schedule`). ``restart_delay_seconds`` simulates the (unbilled) wait
    for spot capacity after each interruption. ``spot_price_ratio`` (spot / on-demand price) turns
    instance seconds into ``BillableTimeInSeconds`` (see :mod:`.summary`). ``hosts`` > 1 runs one
    torchrun agent per simulated host (separate local dirs, one job); an interruption takes
    ``interrupt_hosts`` ("one" host, at random, or "all") away, as spot capacity does.
    ``hard_kill_fraction``: that share of interruptions is a SIGKILL with no SIGTERM (every host).
    ``interrupt_every_steps``: interruptions at training steps drawn for the seed, the same steps
    and kinds whatever the trainer does (see :mod:`.schedule`); ``step_seconds``: the nominal
    seconds per step that turn it into the rate the trainer is told. ``plot``: a PNG file to draw
    the job's timeline into (:mod:`.plot`; needs matplotlib, else one line says how to get it and
    the simulation runs all the same). Raises :class:`ConfigError` on bad input before anything is
    started.
    """
    modes = (("--interruptions", interruptions), ("--interrupt-every", interrupt_every_seconds),
             ("--interrupt-every-steps", interrupt_every_steps))
    given = [name for name, v in modes if v is not None]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} conflict: give one of them")
    if not given:
        interruptions = DEFAULT_INTERRUPTIONS
    n_steps = interrupt_every_steps
    if n_steps is not None and (isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 2):
        raise ConfigError(f"--interrupt-every-steps must be an int >= 2, got {interrupt_every_steps!r}")
    if step_seconds is not None and interrupt_every_steps is None:
        raise ConfigError("--step-seconds only goes with --interrupt-every-steps (it turns steps into a rate)")
    if step_seconds is not None and not step_seconds > 0:
        raise ConfigError(f"--step-seconds must be > 0, got {step_seconds!r}")
    if interruptions is not None and (isinstance(interruptions, bool) or interruptions < 0):
        raise ConfigError(f"--interruptions must be >= 0, got {interruptions!r}")
    if interrupt_every_seconds is not None and not interrupt_every_seconds > 0:
        raise ConfigError(f"--interrupt-every must be > 0 seconds, got {interrupt_every_seconds!r}")
    if total_steps is not None and (isinstance(total_steps, bool) or total_steps < 1):
        raise ConfigError(f"--total-steps must be >= 1, got {total_steps!r}")
    if not grace_seconds > 0:
        raise ConfigError(f"--grace must be > 0 seconds, got {grace_seconds!r}")
    if max_wait_seconds is not None and not max_wait_seconds > 0:
        raise ConfigError(f"--max-wait must be > 0 seconds, got {max_wait_seconds!r}")
    if not restart_delay_seconds >= 0:
        raise ConfigError(f"--restart-delay must be >= 0 seconds, got {restart_delay_seconds!r}")
    if not 0 < spot_price_ratio <= 1:
        raise ConfigError(f"--spot-price-ratio is spot price / on-demand price, in (0, 1]; got {spot_price_ratio!r}")
    if isinstance(hosts, bool) or not isinstance(hosts, int) or hosts < 1:
        raise ConfigError(f"--hosts must be an int >= 1, got {hosts!r}")
    if isinstance(hard_kill_fraction, bool) or not 0 <= hard_kill_fraction <= 1:
        raise ConfigError(f"--hard-kill-fraction is a share of the interruptions, in [0, 1]; got {hard_kill_fraction!r}")
    if interrupt_hosts not in ("one", "all"):
        raise ConfigError(f"--interrupt-hosts is 'one' or 'all', got {interrupt_hosts!r}")
    cmd = _resolve_cmd(cmd)
    host_commands(cmd, hosts, port=0)  # refuse a command that cannot run on several hosts, now
    scheduler = Scheduler(interruptions=interruptions, every_seconds=interrupt_every_seconds, seed=seed,
                          total_steps=total_steps, hard_kill_fraction=hard_kill_fraction,
                          every_steps=interrupt_every_steps, step_seconds=step_seconds)
    sim = Simulation(cmd, scheduler=scheduler, s3_uri=s3_uri, grace_s=grace_seconds, max_wait_s=max_wait_seconds,
                     restart_delay_s=restart_delay_seconds, spot_price_ratio=spot_price_ratio, seed=seed,
                     json_output=json_output, stream=stream, hosts=hosts, interrupt_hosts=interrupt_hosts)
    # If the simulator itself is terminated, unwind so the trainer's group and the S3 server go too.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        rc = sim.run()
        record = sim.record()
        s = summary(record)
        if json_output:
            stream.write(json.dumps({"events": sim.statuses, **s}, indent=2) + "\n")
        else:
            stream.write(format_summary(s))
        stream.flush()
        if plot is not None:
            _write_plot(record, s, plot, sys.stderr if json_output else stream)
        return rc
    finally:
        sim.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if sim.embedded_s3 and not json_output:
            stream.write(f"The embedded S3 server has stopped; its data ({sim.s3.s3_uri}) is gone.\n")
            stream.flush()


def _write_plot(record: Any, s: dict[str, Any], path: str | os.PathLike[str], out: TextIO) -> None:
    from spotckpt.tools.simulate.plot import plot_job, plot_unavailable

    why = plot_unavailable()
    if why is not None:
        out.write(f"No timeline: {why}.\n")
    else:
        plot_job(record, s, path)
        out.write(f"Timeline of the job: {os.path.abspath(path)}\n")
    out.flush()


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``simulate``'s options to ``parser`` (the CLI's subcommand parser)."""
    parser.add_argument("--interruptions", type=int, default=None, metavar="N",
                        help=f"interrupt the first N instances once each (default {DEFAULT_INTERRUPTIONS}): at "
                             "a step inside the run with --total-steps, else 0.5-2 s after first progress")
    parser.add_argument("--interrupt-every", type=float, default=None, metavar="S", dest="interrupt_every",
                        help="interrupt every instance about every S seconds of training (U(0.5, 1.5) * S)")
    parser.add_argument("--interrupt-every-steps", type=int, default=None, metavar="N", dest="interrupt_every_steps",
                        help="interrupt at training steps drawn for the seed, about every N steps (U(0.5, 1.5) * N "
                             "apart): the same steps and kinds whatever the trainer does, so runs with the same "
                             "seed meet the same interruptions")
    parser.add_argument("--step-seconds", type=float, default=None, metavar="T", dest="step_seconds",
                        help="with --interrupt-every-steps: the nominal seconds per step; the trainer is told "
                             "SPOTCKPT_INTERRUPTIONS=per_hour=3600/(N*T) (without it: no rate)")
    parser.add_argument("--total-steps", type=int, default=None, metavar="N", dest="total_steps",
                        help="the trainer's final step, if known: interruptions land inside the run, never "
                             "at or after step N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the interruption times (default 0)")
    parser.add_argument("--grace", type=float, default=10.0, metavar="S",
                        help="seconds between SIGTERM and SIGKILL (default 10; SageMaker uses 120)")
    parser.add_argument("--max-wait", type=float, default=None, metavar="S", dest="max_wait",
                        help="MaxWaitTimeInSeconds: stop the job (MaxWaitTimeExceeded, exit 3) after S seconds")
    parser.add_argument("--restart-delay", type=float, default=1.0, metavar="S", dest="restart_delay",
                        help="simulated, unbilled wait for spot capacity before each restart (default 1)")
    parser.add_argument("--spot-price-ratio", type=float, default=DEFAULT_SPOT_PRICE_RATIO, metavar="R",
                        dest="spot_price_ratio",
                        help=f"spot price / on-demand price (default {DEFAULT_SPOT_PRICE_RATIO:g}, i.e. "
                             f"{(1 - DEFAULT_SPOT_PRICE_RATIO) * 100:.0f} %% off): BillableTimeInSeconds = "
                             "instance seconds * R, as SageMaker's billable time reflects the spot discount; "
                             "1 counts only the unbilled waits")
    parser.add_argument("--s3", default=None, metavar="S3_URI", dest="s3",
                        help="use this s3://bucket/prefix (endpoint from the AWS configuration) instead "
                             "of the embedded S3 server; checkpoints go to S3_URI/sim-<timestamp>-<id>, so every "
                             "simulation starts from an empty prefix, and stay there")
    parser.add_argument("--hosts", type=int, default=1, metavar="N",
                        help="simulate N hosts of one job (CMD must be torchrun: one agent per host, each with "
                             "its own fresh local dir)")
    parser.add_argument("--interrupt-hosts", choices=("one", "all"), default="one", dest="interrupt_hosts",
                        help="with --hosts: an interruption takes one host (default) or all of them")
    parser.add_argument("--hard-kill-fraction", type=float, default=0.0, metavar="F", dest="hard_kill_fraction",
                        help="make that share of the interruptions a SIGKILL with no SIGTERM before it (a host "
                             "lost); the summary splits the wasted time into checkpoint stalls, lost work and "
                             "restart + restore")
    parser.add_argument("--json", action="store_true", dest="json", help="print one JSON document instead")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="draw the job's timeline into FILE.png: instances, interruptions, saves, when each "
                             "step became durable locally and in S3, lost work, waits for capacity, and the "
                             "summary (needs matplotlib: pip install 'spotckpt[bench]')")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the training command")


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``simulate`` from the namespace ``add_arguments`` filled in."""
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return simulate(cmd, interruptions=args.interruptions, interrupt_every_seconds=args.interrupt_every,
                    total_steps=args.total_steps, seed=args.seed, grace_seconds=args.grace,
                    max_wait_seconds=args.max_wait, json_output=args.json, s3_uri=args.s3,
                    restart_delay_seconds=args.restart_delay, spot_price_ratio=args.spot_price_ratio,
                    hosts=args.hosts, interrupt_hosts=args.interrupt_hosts,
                    hard_kill_fraction=args.hard_kill_fraction, plot=args.plot,
                    interrupt_every_steps=args.interrupt_every_steps, step_seconds=args.step_seconds)


def _main(argv: list[str] | None = None) -> int:
    """``python -m spotckpt.tools.simulate``: the same as ``spotckpt simulate``."""
    parser = argparse.ArgumentParser(prog="spotckpt simulate", description=(__doc__ or "").split("\n", 1)[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main_from_args(args)
    except ConfigError as exc:
        print(f"spotckpt simulate: error: {exc}", file=sys.stderr)
        return 2
