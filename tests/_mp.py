"""Run a function in N real processes joined by a gloo process group (what torchrun would set up).

`run_workers(fn, world_size, *args)` spawns `world_size` processes, sets RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT / LOCAL_RANK in each as torchrun does, calls `fn(rank, world_size, *args)`,
and returns the list of the values the ranks returned (they must be picklable). A failing rank's
traceback is re-raised in the caller. `fn` must be importable (defined at module level).

The rendezvous goes through a TCPStore that the parent opens on a port the OS picks and keeps open until the
workers are done (`rendezvous_store`), as torchrun's agent does for its workers: no port is chosen, released
and bound again later by a child (another process could take it in between).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import time
import traceback


@contextlib.contextmanager
def rendezvous_store():
    """A TCPStore server on port 0 (the OS picks a free port and it stays bound), open for the `with` block; yields
    the environment that makes `torch.distributed.init_process_group` (env:// or tcp://) in child processes join
    it as clients: MASTER_ADDR, MASTER_PORT and TORCHELASTIC_USE_AGENT_STORE=True, which is how torchrun's
    workers use the store their agent holds."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        yield {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    finally:
        del store


def _entry(rank, world_size, env, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), **env)
    import torch

    torch.set_num_threads(1)
    try:
        # plain pickle bytes: tensors sent through a torch queue travel as shared-memory handles that die
        # with this process, so the parent could block reading them after the child exits
        queue.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:  # report everything to the parent, then fail
        queue.put((rank, False, traceback.format_exc()))
        raise


def run_workers(fn, world_size: int, *args, timeout: float = 600.0):
    with rendezvous_store() as env:
        return _run_workers(fn, world_size, args, timeout, env)


def _run_workers(fn, world_size: int, args, timeout: float, env: dict):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, world_size, env, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while len(results) < world_size and not errors:
        try:
            rank, ok, value = queue.get(timeout=1.0)
        except queue_mod.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
            if dead:
                errors.append(f"rank(s) {dead} exited with codes {[procs[r].exitcode for r in dead]}")
            elif time.monotonic() > deadline:
                errors.append(f"timed out after {timeout:.0f}s")
            continue
        if ok:
            results[rank] = pickle.loads(value)
        else:
            errors.append(f"rank {rank} failed:\n{value}")
    for p in procs:
        p.join(timeout=5 if errors else 60)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
