"""torch.distributed with NCCL's rules, for the fake CUDA device (tests/fake_cuda.py, `FakeCuda(nccl=True)`).

Each rank is a real process of a real gloo process group (torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), so the object collectives (`broadcast_object_list`, `all_gather_object`) and `barrier` really exchange
between the ranks. When the product asks for `nccl`, the collectives first check what NCCL requires:
- tensor collectives (`all_reduce`, `broadcast`, `all_gather`, `reduce_scatter`) take CUDA tensors on the rank's
  current device only; a CPU tensor fails as NCCL fails it ("No backend type associated with device type cpu");
  their values are fake (nothing is reduced: the values on a fake device are not known);
- object collectives pickle through a tensor on `torch.cuda.current_device()`: the rank must have made its own GPU
  current first (torch's documented responsibility of the caller), else two ranks would share GPU 0.
`DistributedDataParallel` is a double: it checks `device_ids` against the current device and the device of every
parameter and buffer, then calls the module (no gradient all-reduce: its values would be fake).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor


class NcclRuleError(RuntimeError):
    pass


def install(harness: Any, stack: contextlib.ExitStack) -> dict[str, Any]:
    """Install the doubles on `stack`; returns their state ({'backend': the process group's backend})."""
    from unittest import mock

    state: dict[str, Any] = {"backend": None}
    real = {name: getattr(dist, name) for name in ("init_process_group", "broadcast_object_list",
                                                   "all_gather_object", "barrier")}

    def rank_device() -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())

    def init_process_group(backend: str | None = None, *args: Any, **kwargs: Any) -> None:
        state["backend"] = backend
        harness.record("dist.init_process_group", None, backend=backend, current=torch.cuda.current_device())
        real["init_process_group"]("gloo", *args, **kwargs)

    def check_tensor(what: str, t: Any) -> None:
        if state["backend"] != "nccl":
            return
        if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
            raise NcclRuleError(f"{what}: No backend type associated with device type "
                                f"{getattr(t, 'device', torch.device('cpu')).type} (NCCL reduces CUDA tensors only)")
        if t.device != rank_device():
            raise NcclRuleError(f"{what}: tensor on {t.device}, but this rank's current device is {rank_device()}")
        if not isinstance(t, FakeTensor):
            raise NcclRuleError(f"{what}: a real CUDA tensor under the fake device")

    def tensor_collective(name: str) -> Any:
        def collective(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            for t in tensor if isinstance(tensor, (list, tuple)) else [tensor]:
                check_tensor(f"torch.distributed.{name}", t)
            harness.record(f"dist.{name}", getattr(tensor, "device", None), backend=state["backend"])
            return None
        return collective

    def check_object_device(what: str) -> None:
        if state["backend"] != "nccl":
            return
        expected = dist.get_rank() % max(1, torch.cuda.device_count())
        local = int(__import__("os").environ.get("LOCAL_RANK", expected))
        if torch.cuda.current_device() != local:
            raise NcclRuleError(f"{what}: current CUDA device is {torch.cuda.current_device()}, this rank's is "
                                f"cuda:{local} (call torch.cuda.set_device first)")

    def object_collective(name: str) -> Any:
        def collective(*args: Any, **kwargs: Any) -> Any:
            check_object_device(f"torch.distributed.{name}")
            harness.record(f"dist.{name}", None, backend=state["backend"])
            return real[name](*args, **kwargs)
        return collective

    def barrier(*args: Any, **kwargs: Any) -> Any:
        check_object_device("torch.distributed.barrier")
        harness.record("dist.barrier", None, backend=state["backend"])
        return real["barrier"]()

    class DistributedDataParallel(torch.nn.Module):
        def __init__(self, module: torch.nn.Module, device_ids: list[int] | None = None, **_: Any):
            super().__init__()
            if state["backend"] == "nccl":
                if device_ids != [torch.cuda.current_device()]:
                    raise NcclRuleError(f"DistributedDataParallel: device_ids {device_ids}, current device "
                                        f"{torch.cuda.current_device()}")
                want = torch.device("cuda", device_ids[0])
                for name, t in [*module.named_parameters(), *module.named_buffers()]:
                    if t.device != want:
                        raise NcclRuleError(f"DistributedDataParallel: {name} on {t.device}, device_ids {device_ids}")
            harness.record("dist.ddp", None, device_ids=device_ids)
            self.module = module

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.module(*args, **kwargs)

        @contextlib.contextmanager
        def no_sync(self) -> Any:
            yield

    p = stack.enter_context
    p(mock.patch.object(dist, "init_process_group", init_process_group))
    for name in ("all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_gather_into_tensor"):
        p(mock.patch.object(dist, name, tensor_collective(name)))
    for name in ("broadcast_object_list", "all_gather_object"):
        p(mock.patch.object(dist, name, object_collective(name)))
    p(mock.patch.object(dist, "barrier", barrier))
    p(mock.patch.object(torch.nn.parallel, "DistributedDataParallel", DistributedDataParallel))
    return state
