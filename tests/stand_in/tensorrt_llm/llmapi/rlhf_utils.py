"""`WorkerExtension`: the RL methods mixed into every Ray worker (`ray_worker_extension_cls`), with the real
contracts: `update_weights` takes one bucket `{device id: [(name, handle)]}` per call and `None` to finish."""

from __future__ import annotations

import base64
import pickle


class WorkerExtension:
    def update_weights(self, ipc_handles: dict | None = None):
        if ipc_handles is None:
            return self._finish_weights()
        if self.device_id not in ipc_handles:
            raise ValueError(f"update_weights: no handles for this worker's device {self.device_id} "
                             f"(got {sorted(ipc_handles)})")
        mine = ipc_handles[self.device_id]
        if isinstance(mine, str):  # the base64 form of later releases
            mine = pickle.loads(base64.b64decode(mine))
        self._load_weights([(name, fn(*args)) for name, (fn, args) in mine])
        self.senders |= {_sender(args) for _, (fn, args) in mine} - {None}
        return None

    def check_weights_updated(self) -> bool:
        return all(bool((t == 0).all()) for t in self.shard.values())

    def reset_prefix_cache(self) -> None:
        self.prefix_cache_resets += 1


def _sender(args) -> int | None:
    """The pid of the process that made a CPU shared-memory handle (torch names the file /torch_<pid>_...)."""
    for a in args:
        if isinstance(a, tuple):
            for b in a:
                if isinstance(b, bytes) and b.startswith(b"/torch_"):
                    return int(b.split(b"_")[1])
    return None
