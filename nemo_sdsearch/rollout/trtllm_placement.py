"""One TensorRT-LLM engine per data-parallel replica, on that replica's own GPUs, refitted from its ranks.

Under torchrun (actor=megatron, generator=trtllm) every data-parallel replica (its tp x pp ranks) runs one
engine, with `trtllm.tensor_parallel` workers, on GPUs that belong to the replica, started by the
replica's leader. The pieces, in the order a run uses them:

1. **Where.** Every rank reports its `GPUSlot` (node address, local CUDA index, device UUID);
   `job_bundles` turns the job's slots into one Ray placement group of one-GPU bundles, node by node in
   local-index order (created once, by global rank 0, on the job's own Ray cluster: `slurm/common.sh`
   starts a head on the first node and a worker on every other node and exports RAY_ADDRESS).
   `engine_bundles` picks the bundles of the replica's first `trtllm.tensor_parallel` ranks (they must
   share a node: the refit passes CUDA IPC handles). The leader hands them to TensorRT-LLM as
   `ray_placement_config=RayPlacementConfig(placement_groups=[pg], placement_bundle_indices=[bundles])`
   and, once the engine is up, checks that its workers' device UUIDs are exactly those of the chosen
   ranks: a placement Ray resolved otherwise fails loudly instead of landing on another replica's GPUs.
2. **A clean environment.** `engine_environment()` hides the SLURM / PMI / PMIx / Open MPI variables and
   torchrun's (RANK, WORLD_SIZE, MASTER_PORT, ...) while TensorRT-LLM is imported and the engine is built:
   its Ray executor copies the driver's environment into every worker, and MPI detection or a second
   rendezvous on torchrun's MASTER_PORT would follow them there.
3. **Refit.** `replica_refit` is collective over the replica: for each bucket of the weight stream every
   rank whose GPU hosts an engine worker makes CUDA IPC handles of ITS OWN copy of the bucket (the stream
   gives every rank every tensor), the leader gathers them into `{uuid: [(name, handle)]}` and sends one
   `update_weights` RPC, then releases the ranks (whose tensors must outlive the RPC). No rank copies
   weights onto another rank's GPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from nemo_sdsearch.errors import ConfigError

# Variables of the launcher (SLURM, PMI/PMIx, Open MPI, torchrun) that must not reach TensorRT-LLM's workers.
SCRUB_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "TORCHELASTIC_")
SCRUB_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
               "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PMI_FD", "PMI_SIZE",
               "PMI_RANK")
RAY_NAMESPACE = "nemo_sdsearch"


def _scrubbed(name: str) -> bool:
    return name in SCRUB_NAMES or name.startswith(SCRUB_PREFIXES)


@contextlib.contextmanager
def engine_environment():
    """Hide the launcher's variables (see module docstring) inside the block; restore them after.
    Yields the names hidden."""
    hidden = {k: v for k, v in os.environ.items() if _scrubbed(k)}
    for k in hidden:
        del os.environ[k]
    try:
        yield sorted(hidden)
    finally:
        os.environ.update(hidden)


# ---------------------------------------------------------------------------------------------------
# Where the engine runs
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPUSlot:
    node: str          # the node's address as Ray names it (`node:<address>` resources)
    local_index: int   # CUDA device index on that node
    uuid: str          # "GPU-..." as TensorRT-LLM's report_device_id returns it


def local_gpu_slot() -> GPUSlot:
    """This rank's GPU."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("generator=trtllm under torchrun needs a CUDA GPU on every rank")
    index = torch.cuda.current_device()
    return GPUSlot(node_address(), index, "GPU-" + str(torch.cuda.get_device_properties(index).uuid))


def node_address() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - Ray absent: the address other nodes reach us at
        import socket

        return socket.gethostbyname(socket.gethostname())


def job_bundles(slots: Sequence[GPUSlot]) -> tuple[list[dict], dict[GPUSlot, int]]:
    """One Ray bundle per GPU of the job: nodes in order of their first rank, GPUs in local-index order
    inside a node, each bundle pinned to its node. Returns (bundles, bundle index of every slot).

    Ray gives a node's bundles its free GPUs lowest index first, so on a cluster that only this job uses
    bundle k of a node is that node's k-th GPU when the job uses all of them; the engine checks it."""
    nodes: list[str] = []
    for s in slots:
        if s.node not in nodes:
            nodes.append(s.node)
    bundles: list[dict] = []
    index: dict[GPUSlot, int] = {}
    for node in nodes:
        local = sorted({s for s in slots if s.node == node}, key=lambda s: s.local_index)
        if [s.local_index for s in local] != list(range(len(local))):
            raise ConfigError(f"config key cluster.gpus_per_node: node {node} runs ranks on GPUs "
                              f"{[s.local_index for s in local]}; one engine per replica needs the job to use "
                              "every GPU of its nodes, 0..n-1 (launch gpus_per_node ranks per node)")
        for s in local:
            index[s] = len(bundles)
            bundles.append({"GPU": 1, "CPU": 1, f"node:{node}": 0.001})
    return bundles, index


def engine_bundles(replica_slots: Sequence[GPUSlot], engine_tp: int, index: dict[GPUSlot, int]) -> list[int]:
    """The bundles of one replica's engine: its first `engine_tp` ranks' GPUs (leader first)."""
    if engine_tp > len(replica_slots):
        raise ConfigError(f"config key trtllm.tensor_parallel: {engine_tp} engine GPUs do not fit in a data-parallel "
                          f"replica of {len(replica_slots)} GPUs (megatron.tensor_parallel x pipeline_parallel); "
                          "an engine runs on its replica's own GPUs")
    chosen = list(replica_slots[:engine_tp])
    if len({s.node for s in chosen}) > 1:
        raise ConfigError(f"config key trtllm.tensor_parallel: the engine's {engine_tp} GPUs would span nodes "
                          f"{sorted({s.node for s in chosen})}; keep trtllm.tensor_parallel within one pipeline "
                          "stage's GPUs on one node (<= megatron.tensor_parallel)")
    return [index[s] for s in chosen]


@dataclass
class EnginePlacement:
    """What a replica leader passes to its engine, and what the engine must report back."""
    placement_group: Any
    bundle_indices: list[int]
    expected_uuids: list[str]

    def llm_kwargs(self, api) -> dict:
        if api.RayPlacementConfig is None:
            raise ImportError(f"TensorRT-LLM {api.version} has no RayPlacementConfig: one engine per data-parallel "
                              "replica needs a release whose LLM takes ray_placement_config (1.2 or newer)")
        return {"ray_placement_config": api.RayPlacementConfig(placement_groups=[self.placement_group],
                                                               placement_bundle_indices=[list(self.bundle_indices)])}

    def check(self, reported: Iterable[str]) -> None:
        norm = lambda u: str(u).lower().removeprefix("gpu-")
        got, want = sorted(norm(u) for u in reported), sorted(norm(u) for u in self.expected_uuids)
        if got != want:
            raise RuntimeError(f"the TensorRT-LLM engine's workers run on GPUs {sorted(reported)}, not on this "
                               f"replica's {sorted(self.expected_uuids)} (placement bundles {self.bundle_indices}); "
                               "is another job using this Ray cluster, or does the job leave GPUs of a node unused?")


def connect_ray():
    """Join the job's Ray cluster (RAY_ADDRESS, exported by slurm/common.sh) as a driver."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("config key generator: generator=trtllm under torchrun needs the job's Ray cluster: "
                          "launch through slurm/common.sh (it starts one and exports RAY_ADDRESS) or run "
                          "`ray start --head --port 6379` on the first node and export RAY_ADDRESS=<host>:6379")
    if not ray.is_initialized():
        ray.init(address=address, namespace=RAY_NAMESPACE, ignore_reinit_error=True, log_to_driver=False)
    return ray


def plan_replica_engines(slots: Sequence[GPUSlot], replica_ranks: Sequence[int], engine_tp: int, rank: int,
                         barrier: Callable[[], None], group_name: str) -> EnginePlacement | None:
    """Collective over the world: global rank 0 creates the job's placement group (named `group_name`),
    then every replica leader (first rank of `replica_ranks`) looks it up and gets its engine's placement;
    other ranks get None. `slots[r]` is global rank r's GPU."""
    bundles, index = job_bundles(slots)
    mine = engine_bundles([slots[r] for r in replica_ranks], engine_tp, index)  # every rank: same errors
    if rank == 0:
        ray = connect_ray()
        pg = ray.util.placement_group(bundles, strategy="PACK", name=group_name)
        ray.get(pg.ready(), timeout=600)
    barrier()
    if rank != replica_ranks[0]:
        return None
    ray = connect_ray()
    pg = ray.util.get_placement_group(group_name)
    return EnginePlacement(pg, mine, [slots[r].uuid for r in replica_ranks[:engine_tp]])


# ---------------------------------------------------------------------------------------------------
# Refit over the replica
# ---------------------------------------------------------------------------------------------------
def ipc_handles(bucket, dtype, keep: list) -> list:
    """[(name, reduce_tensor(t))] of `bucket` on THIS process's current CUDA device (cast to `dtype`); the
    tensors go to `keep`, which must outlive the RPC that uses the handles."""
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    device = torch.device("cuda", torch.cuda.current_device())
    out = []
    for name, t in bucket:
        t = t.detach().to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        keep.append(t.contiguous())
        out.append((name, reduce_tensor(keep[-1])))
    torch.cuda.synchronize(device)
    return out


@dataclass
class ReplicaRefit:
    """Every rank of a replica holds one when the replica runs a TensorRT-LLM engine; `refit(weights)` is
    collective over the replica (see module docstring). `rpc` is the leader's engine RPC (None elsewhere);
    `gather(obj)` returns the replica's objects on the leader (None elsewhere); `release()` is the
    replica-wide point after which handles may die."""
    uuid: str
    engine_uuids: list[str]
    bucket_bytes: int
    weight_dtype: Any
    gather: Callable[[Any], list | None]
    release: Callable[[], None]
    rpc: Callable[..., Any] | None = None

    def refit(self, weights) -> None:
        from nemo_sdsearch.rollout.generator import iter_buckets

        hosts_worker = self.uuid in self.engine_uuids
        items = ((k, v) for k, v in weights if not k.endswith("rotary_emb.inv_freq"))
        for bucket in iter_buckets(items, self.bucket_bytes):
            keep: list = []
            mine = (self.uuid, ipc_handles(bucket, self.weight_dtype, keep)) if hosts_worker else None
            gathered = self.gather(mine)
            if self.rpc is not None:
                handles = dict(g for g in gathered if g is not None)
                missing = set(self.engine_uuids) - set(handles)
                if missing:
                    raise RuntimeError(f"no rank of this replica holds engine GPU(s) {sorted(missing)}")
                self.rpc("update_weights", handles)
            self.release()
            del bucket, mine, gathered, keep
        if self.rpc is not None:
            self.rpc("update_weights", None)
        self.release()
