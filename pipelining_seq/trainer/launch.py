"""``pipelining-seq run | validate | ls``: recipes from the command line.

``run`` checks the recipe with the requested process count first (so a bad recipe fails
before any process starts), refuses a ``job.dump_folder`` another run holds, says "nothing to
do" for a resume at or past ``training.steps``, then runs ``torchrun ... -m
pipelining_seq.trainer.train recipe key=value ...`` in its own session, tied to this
process: if the launcher dies torchrun gets SIGKILL (and the ranks, which watch torchrun,
end); SIGINT/SIGTERM reach the ranks, which stop cleanly at a step boundary. ``validate`` is the same check without processes, ``ls`` lists the
shipped recipes. A recipe is a YAML path or the name of a file in ``recipes/``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
from importlib import resources
from pathlib import Path

from .config import ConfigError, JobConfig, load_config, to_yaml
from .layout import chunk_lengths, n_microbatches, schedule_info, stage_ranks, world_size
from .validation import validate_config

__all__ = ["add_arguments", "find_recipe", "main", "recipe_dirs", "torchrun_command"]

logger = logging.getLogger(__name__)


def recipe_dirs() -> list[Path]:
    """Where recipe names are looked up: ./recipes, then the recipes shipped in the package."""
    dirs = [Path.cwd() / "recipes", Path(str(resources.files("pipelining_seq") / "recipes"))]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d.resolve() not in [x.resolve() for x in dirs[:i]]]


def find_recipe(name: str) -> str:
    """A recipe path from a path or a bare name (``gpt_tiny_cpu``)."""
    if os.path.isfile(name):
        return name
    for d in recipe_dirs():
        for candidate in (d / name, d / f"{name}.yaml"):
            if candidate.is_file():
                return str(candidate)
    raise ConfigError(f"recipe {name!r} not found (not a file, nor in {[str(d) for d in recipe_dirs()]}); see `pipelining-seq ls`")


def torchrun_command(
    recipe: str, overrides: list[str], *, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
    rdzv_endpoint: str | None = None,
) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:
        if rdzv_endpoint is None:
            raise ConfigError("--nnodes > 1 needs --rdzv-endpoint host:port")
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    return cmd + ["-m", "pipelining_seq.trainer.train", recipe, *overrides]


def add_arguments(parser, *, command: str) -> None:
    if command == "ls":
        parser.description = "List the shipped recipes, one line each."
        return
    parser.add_argument("config", help="recipe YAML, or a recipe name from `pipelining-seq ls`")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides (e.g. training.steps=50)")
    parser.add_argument(
        "--nproc-per-node", "--nproc_per_node", type=int, default=None,
        help="processes per node (default: pipeline * dp_shard * tp degrees of the recipe)",
    )
    if command == "run":
        parser.description = "Validate a recipe, then train it with torchrun."
        parser.add_argument("--nnodes", type=int, default=1, help="nodes (torchrun --nnodes)")
        parser.add_argument("--node-rank", type=int, default=0, help="this node's rank (torchrun --node-rank)")
        parser.add_argument("--rdzv-endpoint", default=None, help="host:port of the rendezvous (multi-node)")
        parser.add_argument("--dry-run", action="store_true", help="print the torchrun command instead of running it")
    else:
        parser.description = "Check a recipe and its overrides without starting processes."
        parser.add_argument("--print-config", action="store_true", help="print the merged recipe as YAML")
    # Options may come after the overrides; argparse leaves those to the caller.
    parser.set_defaults(_accepts_extra=True)


def _split_extra(args) -> list[str]:
    extra = list(getattr(args, "extra", []) or [])
    bad = [e for e in extra if "=" not in e or e.startswith("-")]
    if bad:
        raise ConfigError(f"unrecognized arguments {bad}: overrides look like section.field=value")
    return list(args.overrides) + extra


def _describe(cfg: JobConfig, world: int) -> str:
    info = schedule_info(cfg)
    chunks = f", k={cfg.seq1f1b.num_seq_chunks} chunks {chunk_lengths(cfg)}" if info.seq_chunks else ""
    return (
        f"{world} process(es); {info.name} over {len(stage_ranks(cfg))} stages, {n_microbatches(cfg)} micro-batches"
        f"{chunks}; model {cfg.model.n_layers}x{cfg.model.dim}, seq {cfg.training.seq_len}, {cfg.training.steps} steps"
    )


def _ls() -> int:
    dirs = recipe_dirs()
    if not dirs:
        print("no recipes/ folder here and none shipped with the package", file=sys.stderr)
        return 1
    for d in dirs:
        for path in sorted(d.rglob("*.yaml")):
            try:
                cfg = load_config(str(path))
                info = schedule_info(cfg)
                line = f"{world_size(cfg)} proc  {info.name:<14} {cfg.job.description}"
            except ConfigError as e:
                line = f"(invalid: {e})"
            print(f"{str(path.relative_to(d).with_suffix('')):<28} {line}")
    return 0


def main(args) -> int:
    if args.command == "ls":
        return _ls()
    try:
        recipe = find_recipe(args.config)
        overrides = _split_extra(args)
        cfg = load_config(recipe, overrides)
        nproc = world_size(cfg) if args.nproc_per_node is None else args.nproc_per_node
        nnodes = getattr(args, "nnodes", 1)
        if nproc < 1 or nnodes < 1:
            raise ConfigError(
                f"--nproc-per-node {nproc} --nnodes {nnodes}: both must be at least 1 (omit --nproc-per-node "
                f"for the recipe's {world_size(cfg)})"
            )
        validate_config(cfg, world_size=nproc * nnodes)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "validate":
        if args.print_config:
            print(to_yaml(cfg), end="")
        print(f"ok: {recipe}: {_describe(cfg, nproc * nnodes)}")
        return 0
    early = _before_launch(cfg)
    if early is not None:
        return early
    cmd = torchrun_command(
        recipe, overrides, nproc_per_node=nproc, nnodes=nnodes, node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint,
    )
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    env = dict(os.environ)
    # torchrun forces OMP_NUM_THREADS=1 (with a warning) unless set; the trainer sets its own.
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // nproc)))
    # Let the workers import this package even when it is not installed (run from a clone).
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    print(f"+ {shlex.join(cmd)}", flush=True)
    return supervise(cmd, env=env)


def _before_launch(cfg: JobConfig) -> int | None:
    """Refusals and no-ops that need no process: a busy dump folder, nothing left to train."""
    from . import checkpoint, lock, resume

    busy = lock.busy(lock.run_folders(cfg))
    if busy is not None:
        print(f"error: {busy}", file=sys.stderr)
        return 2
    path = checkpoint.resolve_load(cfg)
    if path is not None:
        done = resume.nothing_to_do(checkpoint.read_manifest(path), cfg, path)
        if done is not None:
            print(done)
            return 0
    return None


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: torchrun gets SIGKILL when this launcher
    # dies, even by SIGKILL; the ranks in turn watch torchrun (liveness.py).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _rank_pids(parent: int) -> list[int]:
    """Processes whose parent is ``parent`` (torchrun's workers), from /proc."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == parent:
                    pids.append(int(name))
            except (OSError, IndexError, ValueError):
                continue
    return pids


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _end_stopped_ranks(torchrun: int, started: set[int]) -> set[int]:
    """Once a rank has ended while torchrun runs (the run is failing), SIGKILL the ranks that
    are stopped (SIGSTOP, state T): they cannot act on torchrun's SIGTERM, and torchrun
    would wait out its grace period on them. Returns the ranks seen so far."""
    ranks = {pid for pid in _rank_pids(torchrun) if _state(pid) not in (None, "Z", "X")}
    if started and started - ranks:  # some rank is gone
        for pid in ranks:
            if _state(pid) in ("T", "t"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    return ranks


def supervise(cmd: list[str], *, env: dict[str, str]) -> int:
    """Run torchrun in its own session, tied to this process's life. SIGINT/SIGTERM here are
    passed to the ranks as SIGTERM (they stop at the next step boundary, save if configured,
    and print one line); a second one kills them. Returns torchrun's exit code, or 128 +
    the signal when the run was stopped by one (here, or sent to a rank: rank 0 leaves
    the code in the file named by ``PIPELINING_SEQ_STOP_FILE``)."""
    import json
    import tempfile

    fd, stop_file = tempfile.mkstemp(prefix="pipelining-seq-stop-", suffix=".json")
    os.close(fd)
    os.remove(stop_file)  # rank 0 creates it when a signal stops the run
    env = {**env, "PIPELINING_SEQ_STOP_FILE": stop_file}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    got: list[int] = []

    def forward(signum: int, frame) -> None:
        got.append(signum)
        sig = signal.SIGTERM if len(got) == 1 else signal.SIGKILL
        for pid in _rank_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if len(got) > 1:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    started: set[int] = set()
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                started |= _end_stopped_ranks(proc.pid, started)
            except InterruptedError:
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    stopped = None
    with contextlib.suppress(OSError, ValueError):
        with open(stop_file) as f:
            stopped = json.load(f)
        os.remove(stop_file)
    if got:
        return 128 + got[0]
    if code == 0 and stopped:
        # A signal to a rank stopped the run before training.steps: not a finished run.
        print(f"run stopped early, exit {stopped['code']}: {stopped['line']}", file=sys.stderr, flush=True)
        return int(stopped["code"])
    return code
