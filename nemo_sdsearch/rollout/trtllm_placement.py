"""TensorRT-LLM engines on every GPU of the job, independent of the training layout, refitted by the ranks that
host their workers.

Under torchrun (actor=megatron, generator=trtllm) the job's world is cut into blocks of `trtllm.tensor_parallel`
consecutive ranks (`engine_blocks`); each block runs one engine, whose workers sit on the block's GPUs, started by
the block's first rank (its driver). An engine may hold part of a data-parallel replica (trtllm.tensor_parallel <
megatron tp x pp: several engines per replica) or several replicas (>: one engine across replicas, whose
weights are equal); every GPU generates either way. The pieces, in the order a run uses them:

1. **Where.** Every rank reports its `DeviceSlot` (node IP address, local device index, device id: the GPU's
   UUID on a cluster; on a CPU-only cluster, such as the test cluster, "CPU-<node IP>-<local rank>");
   `job_bundles` turns the job's slots into one Ray placement group of one-device bundles (a GPU and a CPU
   each, a CPU on a CPU-only run: one code path), node by node in local-index order. The job's own Ray
   cluster (`rollout/ray_cluster.py`, started by `slurm/common.sh` with every node's IP address, never a
   host name: a bundle is pinned by `node:<ip>`) holds it. Global rank 0 creates the group once per
   process (`JobPlacement`); every later stage (GRPO, pool, OPSD, evaluation) reuses it, and
   `JobPlacement.remove` takes it down at the end, after every engine is shut down (TensorRT-LLM never
   removes a group it was handed). `engine_bundles` picks the bundles of a block (they must share a node: the
   refit passes IPC handles). The driver hands them to TensorRT-LLM in the form the installed release takes
   (`placement_form`: `ray_placement_config=RayPlacementConfig(...)` on the LLM from 1.2.0rc6 on; the top-level
   `placement_groups` / `placement_bundle_indices` / `per_worker_gpu_share` of the AsyncLLM surface when a
   release's LLM declares those; releases up to 1.2.0rc5 read placement only from TRTLLM_RAY_BUNDLE_INDICES
   inside a Ray actor and are refused) and, once the engine is up, checks that its workers' device ids are
   exactly those of the block: a placement Ray resolved otherwise fails loudly instead of landing on another
   engine's devices.
2. **A clean environment.** `engine_environment()` hides the SLURM / PMI / PMIx / Open MPI variables and
   torchrun's (RANK, WORLD_SIZE, MASTER_PORT, ...) while TensorRT-LLM is imported and the engine is built:
   its Ray executor copies the driver's environment into every worker, and MPI detection or a second
   rendezvous on torchrun's MASTER_PORT would follow them there.
3. **Rollouts.** `EngineSpread`: engine e rolls out every e-th question of a batch; the trajectories are gathered
   on every rank and each data-parallel replica takes its own questions' (a row's random stream belongs to its
   question and sample, so which engine ran it changes nothing).
4. **Refit (the re-shard).** Every rank receives every full HF tensor from its replica's weight stream (gathered
   over Megatron's TP, broadcast over its PP). `ReplicaRefit.refit` is collective over an engine's block: for each
   bucket every rank makes IPC handles of ITS OWN copy of the bucket (CUDA IPC on a GPU, a shared-memory file on
   a CPU run), the driver gathers them into `{device id: [(name, handle)]}` and sends one `update_weights` RPC,
   in which each worker takes its engine-TP slice of the full tensors; then the block's ranks are released
   (their tensors must outlive the RPC). Megatron TP 2 -> engine TP 1 and TP 1 -> TP 2 are both this. No rank
   copies weights onto another rank's device. A block spanning replicas meets the bucket in lock-step: every
   replica streams the same tensors in the same order.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from nemo_sdsearch.errors import ConfigError
from nemo_sdsearch.rollout.ray_cluster import auth_environment, is_launcher_variable, node_ip

RAY_NAMESPACE = "nemo_sdsearch"



@contextlib.contextmanager
def engine_environment():
    """Hide the launcher's variables (see module docstring) inside the block; restore them after.
    Yields the names hidden."""
    hidden = {k: v for k, v in os.environ.items() if is_launcher_variable(k)}
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
class DeviceSlot:
    node: str          # the node's IP address, as Ray names it (`node:<ip>` resources)
    local_index: int   # the device index on that node (CUDA index; the local rank on a CPU-only run)
    uuid: str          # the device id TensorRT-LLM's report_device_id returns: "GPU-<uuid>", or cpu_device_id(...)

    @property
    def resource(self) -> str:
        """The Ray resource a bundle for this device asks for: "GPU" on a cluster, "CPU" on a CPU-only run."""
        return "CPU" if self.uuid.startswith("CPU-") else "GPU"


def cpu_device_id(node: str, index: int) -> str:
    """The device id of a CPU-only run's rank `index` on `node`: what a stand-in engine worker placed on that
    node's index-th bundle reports (the GPU rule, bundle k of a node is its k-th device, carried over)."""
    return f"CPU-{node}-{index}"


def local_device_slot() -> DeviceSlot:
    """This rank's device: its CUDA device, or on a CPU-only run its local rank on this node."""
    import torch

    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        return DeviceSlot(node_ip(), index, "GPU-" + str(torch.cuda.get_device_properties(index).uuid))
    index = int(os.environ.get("LOCAL_RANK", "0"))
    node = node_ip()
    return DeviceSlot(node, index, cpu_device_id(node, index))


def job_bundles(slots: Sequence[DeviceSlot]) -> tuple[list[dict], dict[DeviceSlot, int]]:
    """One Ray bundle per device of the job: nodes in order of their first rank, devices in local-index order
    inside a node, each bundle pinned to its node. A GPU bundle also holds one CPU (a TensorRT-LLM worker
    actor holds one CPU for its lifetime besides its GPU share); a CPU-only run's bundle is one CPU. Returns
    (bundles, bundle index of every slot).

    Ray gives a node's bundles its free GPUs lowest index first, so on a cluster that only this job uses
    bundle k of a node is that node's k-th GPU when the job uses all of them; the engine checks it."""
    nodes: list[str] = []
    for s in slots:
        if s.node not in nodes:
            nodes.append(s.node)
    bundles: list[dict] = []
    index: dict[DeviceSlot, int] = {}
    for node in nodes:
        local = sorted({s for s in slots if s.node == node}, key=lambda s: s.local_index)
        if [s.local_index for s in local] != list(range(len(local))):
            raise ConfigError(f"config key cluster.gpus_per_node: node {node} runs ranks on GPUs "
                              f"{[s.local_index for s in local]}; engines on every GPU need the job to use "
                              "every GPU of its nodes, 0..n-1 (launch gpus_per_node ranks per node)")
        for s in local:
            index[s] = len(bundles)
            bundles.append({"GPU": 1, "CPU": 1, f"node:{node}": 0.001} if s.resource == "GPU"
                           else {"CPU": 1, f"node:{node}": 0.001})
    return bundles, index


def engine_blocks(world: int, engine_tp: int) -> list[list[int]]:
    """The job's engines, independent of the training layout: consecutive blocks of `engine_tp` global ranks (every
    GPU of the job runs one engine worker; torchrun numbers a node's ranks consecutively, so a block whose size
    divides the GPUs of a node stays inside it). Block e's first rank drives engine e."""
    if engine_tp < 1 or world % engine_tp:
        raise ConfigError(f"config key trtllm.tensor_parallel: {engine_tp} does not divide the job's {world} GPUs")
    return [list(range(start, start + engine_tp)) for start in range(0, world, engine_tp)]


def engine_bundles(block_slots: Sequence[DeviceSlot], index: dict[DeviceSlot, int]) -> list[int]:
    """The bundles of one engine: its block's GPUs (driver first), which must share a node (the refit passes IPC
    handles)."""
    chosen = list(block_slots)
    if len({s.node for s in chosen}) > 1:
        raise ConfigError(f"config key trtllm.tensor_parallel: the engine's {len(chosen)} GPUs would span nodes "
                          f"{sorted({s.node for s in chosen})}; trtllm.tensor_parallel must divide "
                          "cluster.gpus_per_node")
    return [index[s] for s in chosen]


@dataclass
class EngineSpread:
    """How a batch of questions is spread over the job's engines (`engine_blocks`) and the results brought back:
    engine e (driven by its block's first rank) rolls out the items `items[e::count]`; `gather` returns every
    engine's results, in engine order, on every rank (one all-gather over the job's gloo group). A row's random
    stream belongs to its question and sample (`question_row_seed`), so which engine runs a row changes nothing."""
    index: int | None       # the engine this rank drives, None where it drives none
    count: int              # engines in the job
    drivers: list[int]      # the global rank driving each engine
    group: Any = None       # the job's gloo group (None: the default group)

    def share(self, items: Sequence) -> list:
        return list(items[self.index::self.count]) if self.index is not None else []

    def gather(self, local) -> list:
        import torch.distributed as dist

        out = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, local, group=self.group)
        return [out[r] for r in self.drivers]

    def all_reduce(self, tensor):
        """Sum of a CPU tensor over every rank of the job (drivers hold their engines' sums, the others zeros)."""
        import torch.distributed as dist

        dist.all_reduce(tensor, group=self.group)
        return tensor

    def regroup(self, items: Sequence, per_item: int, local: list) -> list:
        """`gather` for rollouts: the flat results of `share(items)` (`per_item` per item, in share order) gathered
        from every engine and put back in the order of `items` (a list of per-item lists)."""
        out: list = [None] * len(items)
        for e, results in enumerate(self.gather(local)):
            for j, i in enumerate(range(e, len(items), self.count)):
                out[i] = results[j * per_item:(j + 1) * per_item]
        return out


PLACEMENT_FORMS = {
    "ray_placement_config": "LLM(ray_placement_config=RayPlacementConfig(placement_groups, placement_bundle_indices, "
                            "per_worker_gpu_share)) (TensorRT-LLM 1.2.0rc6 and newer)",
    "top_level": "top-level placement_groups / placement_bundle_indices / per_worker_gpu_share (the AsyncLLM "
                 "surface, declared by this release's LLM arguments)",
}


def llm_argument_names(api) -> set[str]:
    """The argument names the installed TensorRT-LLM's LLM takes: its TorchLlmArgs fields (pydantic), else the
    LLM constructor's named parameters."""
    import inspect

    fields = set(getattr(api.TorchLlmArgs, "model_fields", None) or {}) if api.TorchLlmArgs is not None else set()
    if not fields:
        try:
            fields = {n for n, p in inspect.signature(api.LLM).parameters.items() if p.kind is not p.VAR_KEYWORD}
        except (TypeError, ValueError):
            fields = set()
    return fields


def placement_form(api) -> str:
    """How the installed TensorRT-LLM takes a Ray placement (a key of PLACEMENT_FORMS), read from its LLM
    arguments: `ray_placement_config` (with a RayPlacementConfig class) first, then the top-level trio. A
    release with neither (1.2.0rc5 and older: placement only from TRTLLM_RAY_BUNDLE_INDICES plus the CURRENT
    placement group, i.e. from inside a Ray actor, which a torchrun rank is not) is refused."""
    names = llm_argument_names(api)
    if "ray_placement_config" in names and getattr(api, "RayPlacementConfig", None) is not None:
        return "ray_placement_config"
    if {"placement_groups", "placement_bundle_indices"} <= names:
        return "top_level"
    raise ImportError(f"TensorRT-LLM {api.version} takes no Ray placement group from its caller (no "
                      "ray_placement_config / placement_groups argument; releases up to 1.2.0rc5 read "
                      "TRTLLM_RAY_BUNDLE_INDICES inside a Ray actor only): engines placed by the job "
                      "needs TensorRT-LLM 1.2.0rc6 or newer (the NGC NeMo 26.04 container ships 1.2.x)")


@dataclass
class EnginePlacement:
    """What an engine's driver passes to its engine, and what the engine must report back."""
    placement_group: Any
    bundle_indices: list[int]
    expected_uuids: list[str]

    def llm_kwargs(self, api) -> dict:
        """The LLM arguments that place the engine on `bundle_indices` of the job's group, in the form the
        installed release takes (`placement_form`); logs which one it used."""
        form = placement_form(api)
        print(f"TensorRT-LLM {api.version}: engine placed through {PLACEMENT_FORMS[form]} on bundles "
              f"{self.bundle_indices}", flush=True)
        place = dict(placement_groups=[self.placement_group], placement_bundle_indices=[list(self.bundle_indices)],
                     per_worker_gpu_share=1.0)
        if form == "ray_placement_config":
            return {"ray_placement_config": api.RayPlacementConfig(**place)}
        return place

    def check(self, reported: Iterable[str]) -> None:
        norm = lambda u: str(u).lower().removeprefix("gpu-")
        got, want = sorted(norm(u) for u in reported), sorted(norm(u) for u in self.expected_uuids)
        if got != want:
            raise RuntimeError(f"the TensorRT-LLM engine's workers run on devices {sorted(reported)}, not on this "
                               f"block's {sorted(self.expected_uuids)} (placement bundles {self.bundle_indices}); "
                               "is another job using this Ray cluster, or does the job leave devices of a node unused?")


def connect_ray():
    """Join the job's Ray cluster (RAY_ADDRESS, exported by slurm/common.sh) as a driver, through this node's
    own raylet (the driver's node IP given explicitly: Ray finds the local raylet by it)."""
    import ray

    address = os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("config key generator: generator=trtllm under torchrun needs the job's Ray cluster: "
                          "launch through slurm/common.sh (it starts one and exports RAY_ADDRESS) or run "
                          "`python -m nemo_sdsearch.rollout.ray_cluster start --head-ip <first node's IP>` on every "
                          "node and export RAY_ADDRESS=<that IP>:6379")
    if not ray.is_initialized():
        auth_environment()  # the cluster's authentication rule (ray_cluster.py), before Ray reads it
        ray.init(address=address, namespace=RAY_NAMESPACE, ignore_reinit_error=True, log_to_driver=False,
                 _node_ip_address=node_ip())
    return ray


def start_local_ray():
    """A private Ray instance for a one-process run (no RAY_ADDRESS): started here, never attached to whatever
    cluster `address="auto"` would find on the machine (TensorRT-LLM's own ray.init(address="auto") then joins
    this one)."""
    import ray

    if not ray.is_initialized():
        auth_environment()
        ray.init(address="local", namespace=RAY_NAMESPACE, include_dashboard=False, log_to_driver=False)
    return ray


class JobPlacement:
    """The job's one placement group (named `name`), per process: `plan` creates it on global rank 0 the first
    time (and reuses it after: every stage of a run builds its engines on it), `remove` takes it down at the
    end. Collective over the world where it says so."""

    def __init__(self, name: str):
        self.name = name
        self.created = False

    def plan(self, slots: Sequence[DeviceSlot], block: Sequence[int], rank: int,
             barrier: Callable[[], None]) -> "EnginePlacement | None":
        """Collective over the world: global rank 0 creates the group (or checks the existing one holds the
        same bundles), then every engine's driver (first rank of its `block`, `engine_blocks`) looks it up and
        gets its engine's placement; other ranks get None. `slots[r]` is global rank r's device."""
        bundles, index = job_bundles(slots)
        mine = engine_bundles([slots[r] for r in block], index)  # every rank: same errors
        if rank == 0:
            ray = connect_ray()
            if not self.created:
                pg = ray.util.placement_group(bundles, strategy="PACK", name=self.name)
                ray.get(pg.ready(), timeout=600)
                self.created = True
                print(f"placement group {self.name} created: {len(bundles)} bundles", flush=True)
            else:
                pg = ray.util.get_placement_group(self.name)
                if pg.bundle_specs != bundles:
                    raise RuntimeError(f"placement group {self.name} holds bundles {pg.bundle_specs}, this stage "
                                       f"asks for {bundles}")
                print(f"placement group {self.name} reused", flush=True)
        barrier()
        if rank != block[0]:
            return None
        ray = connect_ray()
        pg = ray.util.get_placement_group(self.name)
        return EnginePlacement(pg, mine, [slots[r].uuid for r in block])

    def remove(self, rank: int) -> list[str] | None:
        """Rank 0 (after every engine of the job is shut down): remove the group; returns the names of this
        job's groups Ray still holds (none expected). Other ranks: None."""
        if rank != 0 or not self.created:
            return None
        ray = connect_ray()
        ray.util.remove_placement_group(ray.util.get_placement_group(self.name))
        self.created = False
        left = [g["name"] for g in ray.util.placement_group_table().values()
                if g.get("name", "").startswith(self.name) and g.get("state") != "REMOVED"]
        return left


# ---------------------------------------------------------------------------------------------------
# Refit over an engine's block
# ---------------------------------------------------------------------------------------------------
def ipc_handles(bucket, dtype, keep: list, device=None) -> list:
    """[(name, (rebuild, args))] of `bucket` cast to `dtype` on `device` (default: this process's current CUDA
    device, or the CPU on a CPU-only run): CUDA IPC handles (`reduce_tensor`) on a GPU; on the CPU, the name of
    a shared-memory file (`cpu_ipc_handle`: a receiver on the same node opens it, across network namespaces
    too). The receiver calls `rebuild(*args)`. The tensors go to `keep`, which must outlive the RPC that uses
    the handles."""
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    out = []
    for name, t in bucket:
        t = t.detach().to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        # a copy on the CPU: sharing a storage moves it to shared memory, and the stream's tensors may be the
        # trained parameters themselves
        keep.append(t.clone() if device.type == "cpu" else t.contiguous())
        out.append((name, cpu_ipc_handle(keep[-1]) if device.type == "cpu" else reduce_tensor(keep[-1])))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def cpu_ipc_handle(t) -> tuple:
    """(rebuild, args) of a CPU tensor over a shared-memory file, made of plain values (the file's name, sizes),
    so any pickler carries it (Ray's cloudpickle would otherwise copy a storage's bytes): torch's file_system
    sharing, the storage's reference count taken for the receiver (`rebuild_cpu_tensor` gives it back)."""
    import torch.multiprocessing as tmp
    from torch.multiprocessing.reductions import reduce_storage

    tmp.set_sharing_strategy("file_system")
    rebuild_storage, storage_args = reduce_storage(t.untyped_storage())
    return rebuild_cpu_tensor, (rebuild_storage, storage_args, t.dtype, tuple(t.shape), tuple(t.stride()),
                                t.storage_offset())


def rebuild_cpu_tensor(rebuild_storage, storage_args, dtype, size, stride, offset):
    """The receiving side of `cpu_ipc_handle`: the sender's tensor, mapped from its shared-memory file."""
    import torch

    storage = rebuild_storage(*storage_args)
    return torch.empty((0,), dtype=dtype).set_(storage, offset, size, stride)


@dataclass
class ReplicaRefit:
    """Every rank of an engine's block holds one (generator=trtllm under torchrun); `refit(weights)` is collective
    over the block (see module docstring). `rpc` is the driver's engine RPC (None elsewhere); `gather(obj)`
    returns the block's objects on the driver (None elsewhere); `release()` is the block-wide point after which
    handles may die."""
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
                    raise RuntimeError(f"no rank of this engine's block holds device(s) {sorted(missing)}")
                self.rpc("update_weights", handles)
            self.release()
            del bucket, mine, gathered, keep
        if self.rpc is not None:
            self.rpc("update_weights", None)
        self.release()
