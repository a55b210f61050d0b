"""A fake CUDA device: the product's GPU code paths run on a CPU-only machine, with CUDA's rules enforced.

What it is. Inside `FakeCuda()`, every tensor on a CUDA device is a torch `FakeTensor` (torch's own fake-tensor
mode: shapes, dtypes and devices propagate through real operator implementations, no arithmetic is done, and an
operation that mixes a CPU tensor into CUDA work raises `FakeTensorDeviceMismatchError`, as a GPU would refuse it).
Everything that never touches CUDA — decoding, numpy, h5py, building a timm model, loading its weights — runs for
real, as it would on a GPU machine. `torch.cuda`'s queries answer as an H200 would (name, compute capability 9.0,
memory); streams, events and CUDA graphs are small doubles that enforce the real API's rules; `torch.distributed`
under the `nccl` backend gets NCCL's device rule (a collective on a tensor that is not on the rank's current GPU
fails) on top of a real gloo process group for the object collectives, and `DistributedDataParallel` is a double
that checks `device_ids` against where the module's parameters are.

What it checks: placement (device), dtypes, shapes and call order (the `log`). Never speed, never values.

Where a value must cross to the host (a copy to CPU memory, `.item()`, `float(t)`, saving tensors to a file), the
fake device cannot know it: the host receives a deterministic stand-in and the crossing is logged:
- a floating-point tensor copied to the host reads 1/C everywhere, C its last dimension (a valid row of
  probabilities over C classes: a study gets uniform probabilities, so nothing is flagged);
- integer tensors read 0, booleans False; `.item()` on a CUDA tensor reads 0 (so a GradScaler sees no inf/NaN and
  its step is taken, and a loss reads 0.0);
- `x[mask]` with a boolean mask (its length is the mask's count, read back from the GPU: a synchronisation,
  logged as `sync`) selects every element;
- `torch.save` writes those stand-ins in place of CUDA tensors.
Tests that use the harness say so where they rely on these.

The rules enforced (each what real CUDA/torch does, cited in the double):
- reading a CUDA tensor on the host (`.numpy()`) without copying it first fails;
- during a CUDA graph capture: no synchronisation, no host copy, no `.item()`; capture never on the default stream;
  a graph is replayed only after its capture ended;
- an event lives on one device: recording it on a stream of another device fails;
- `Tensor.record_stream` takes a stream of the tensor's own device;
- `torch.cuda.set_device` takes an existing device; the current device is per host thread (cudaSetDevice);
- NCCL: tensor collectives only on CUDA tensors of the rank's current device; object collectives need the rank's
  device made current first (`torch.cuda.set_device`).

Only what a real GPU can show stays out of reach: kernels' numbers, timing, DALI/NVDEC decoding, TensorRT, NCCL's
transport, memory pressure (docs/gpu.md lists them).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import types
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: what the fake GPUs say they are (an H200 as the GPU machines lent to this project have)
GPU_NAME = "NVIDIA H200"
GPU_CAPABILITY = (9, 0)
GPU_MEMORY = 141 * 2**30
GPU_SMS = 132


class FakeCudaError(RuntimeError):
    """A rule of the real CUDA API was broken (the message says which)."""


def stand_in(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The deterministic host value of a CUDA tensor of `shape`/`dtype` (module docstring)."""
    if dtype == torch.bool:
        return torch.zeros(shape, dtype=dtype)
    if dtype.is_floating_point or dtype.is_complex:
        fill = 1.0 / shape[-1] if len(shape) and shape[-1] else 0.0
        return torch.full(shape, fill, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def _is_cuda_spec(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


# ------------------------------------------------------------------------------------------------------------
# streams, events, graphs


class FakeStream:
    """torch.cuda.Stream's double: a device, an id, and the calls made on it."""

    _ids = itertools.count(1)

    def __init__(self, device: Any = None, priority: int = 0, *, harness: FakeCuda | None = None,
                 default: bool = False, **_: Any):
        self._h = harness or FakeCuda.active()
        index = self._h.device_index(device)
        self.device = torch.device("cuda", index)
        self.device_index = index
        self.priority = priority
        self.is_default = default
        self.cuda_stream = 0 if default else next(self._ids)

    def wait_stream(self, other: FakeStream) -> None:
        self._h._check_stream(other)
        self._h.record("stream.wait_stream", self.device, waits_for=other.cuda_stream, stream=self.cuda_stream)

    def wait_event(self, event: FakeEvent) -> None:
        self._h.record("stream.wait_event", self.device, stream=self.cuda_stream)

    def record_event(self, event: FakeEvent | None = None) -> FakeEvent:
        event = event or FakeEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        self._h.check_not_capturing("Stream.synchronize")
        self._h.record("stream.synchronize", self.device, stream=self.cuda_stream)

    def query(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"<FakeStream {self.device} id={self.cuda_stream}{' default' if self.is_default else ''}>"


class FakeEvent:
    """torch.cuda.Event's double: recorded on one device only (CUDA events belong to the device of their first
    record); `synchronize` is a host wait on it (logged); timing is refused (the harness never measures speed)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._h = FakeCuda.active()
        self.device: torch.device | None = None
        self.blocking = blocking
        self.recorded = False

    def record(self, stream: FakeStream | None = None) -> None:
        stream = stream if stream is not None else self._h.current_stream()
        self._h._check_stream(stream)
        if self.device is not None and self.device != stream.device:
            raise FakeCudaError(f"Event device {self.device} does not match recording stream's device "
                                f"{stream.device}")
        self.device = stream.device
        self.recorded = True
        self._h.record("event.record", stream.device, stream=stream.cuda_stream)

    def synchronize(self) -> None:
        self._h.check_not_capturing("Event.synchronize")
        self._h.record("event.synchronize", self.device, blocking=self.blocking, recorded=self.recorded)

    def wait(self, stream: FakeStream | None = None) -> None:
        stream = stream if stream is not None else self._h.current_stream()
        self._h.record("event.wait", stream.device, stream=stream.cuda_stream)

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: FakeEvent) -> float:
        raise FakeCudaError("the fake CUDA device does not measure time")


class FakeGraph:
    """torch.cuda.CUDAGraph's double: capture_begin/end on a non-default stream, replay only after capture."""

    def __init__(self, *_: Any, **__: Any):
        self._h = FakeCuda.active()
        self.captured = False
        self.replays = 0

    def replay(self) -> None:
        if not self.captured:
            raise FakeCudaError("CUDAGraph.replay: the graph was not captured (capture_end was not reached)")
        self._h.check_not_capturing("CUDAGraph.replay")
        self.replays += 1
        self._h.record("graph.replay", None)

    def reset(self) -> None:
        self.captured = False


class _GraphCapture:
    """torch.cuda.graph(...)'s double: capture on `stream` (a side stream; the default stream cannot capture)."""

    def __init__(self, graph: FakeGraph, pool: Any = None, stream: FakeStream | None = None, **_: Any):
        self.graph, self._h = graph, FakeCuda.active()
        self.stream = stream if stream is not None else FakeStream(harness=self._h)
        self._ctx: Any = None

    def __enter__(self) -> None:
        if self.stream.is_default:
            raise FakeCudaError("CUDA graphs cannot be captured on the legacy default stream "
                                "(cudaErrorStreamCaptureUnsupported)")
        self._h.synchronize()  # torch.cuda.graph synchronises before capturing
        self._ctx = self._h.stream(self.stream)
        self._ctx.__enter__()
        self._h._tls.capturing = True
        self._h.record("graph.capture_begin", self.stream.device, stream=self.stream.cuda_stream)

    def __exit__(self, *exc: Any) -> None:
        self._h._tls.capturing = False
        self._ctx.__exit__(*exc)
        if exc[0] is None:
            self.graph.captured = True
            self._h.record("graph.capture_end", self.stream.device)


# ------------------------------------------------------------------------------------------------------------
# the dispatch mode: CUDA tensors fake, everything else real


class _Fakes(FakeTensorMode):
    """torch's fake mode, told that no real CUDA device exists (it asks torch.cuda.is_available(), which the harness
    answers True): it then never copies a constant to a real GPU while propagating it."""

    @property
    def avoid_device_init(self) -> bool:
        return True

    # torch keeps "inside a kernel" (while set, every fake tensor says its device is `meta`) on the mode object; the
    # product runs decode, engine and writer threads, so here it is per thread: one thread inside a kernel must not
    # make another thread's tensors read as `meta`
    _kernel = threading.local()

    @property
    def in_kernel_invocation(self) -> bool:
        return getattr(self._kernel, "active", False)

    @in_kernel_invocation.setter
    def in_kernel_invocation(self, value: bool) -> None:
        self._kernel.active = value


class _Mode(TorchDispatchMode):
    def __init__(self, harness: FakeCuda):
        super().__init__()
        self.h = harness

    def __torch_dispatch__(self, func: Any, types_: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return self.h._dispatch(func, args, kwargs or {})


class FakeCuda:
    """Install with `with FakeCuda() as cuda:`; `cuda.log` lists what happened ((what, device, details) tuples).
    `devices` GPUs are visible; `nccl=True` also installs the torch.distributed doubles."""

    _current: FakeCuda | None = None

    def __init__(self, devices: int = 1, *, nccl: bool = False):
        self.devices = devices
        self.nccl = nccl
        self.log: list[tuple[str, Any, dict[str, Any]]] = []
        self.fake = _Fakes(allow_non_fake_inputs=True)
        self.lock = threading.RLock()
        self._tls = threading.local()
        self._pinned: dict[int, weakref.ref] = {}  # id -> the pinned host tensor (tensors compare elementwise)
        self._stack = contextlib.ExitStack()
        self._default_streams: dict[int, FakeStream] = {}

    # -- installation -------------------------------------------------------------------------------------
    @classmethod
    def active(cls) -> FakeCuda:
        if cls._current is None:
            raise FakeCudaError("no fake CUDA device is installed")
        return cls._current

    def __enter__(self) -> FakeCuda:
        if FakeCuda._current is not None:
            raise FakeCudaError("a fake CUDA device is installed already")
        FakeCuda._current = self
        s = self._stack
        # torch's own step for fake CUDA tensors on a machine without CUDA: a no-op CUDA device guard (permanent
        # for the process, and harmless where no CUDA device exists)
        torch._C._ensureCUDADeviceGuardSet()
        # and its contract for `torch.tensor(data, device="cuda")`: made on the CPU, then lifted (into the mode)
        lift = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        s.callback(torch._C._set_only_lift_cpu_tensors, lift)
        try:
            self._patch_cuda(s)
            self._patch_threads(s)
            self._patch_tensor(s)
            if self.nccl:
                self._patch_distributed(s)
            s.callback(self._forget_product_caches)
            s.enter_context(_Mode(self))
        except BaseException:
            s.close()
            FakeCuda._current = None
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._stack.close()
        finally:
            FakeCuda._current = None

    def _patch_cuda(self, s: contextlib.ExitStack) -> None:
        c = torch.cuda
        p = s.enter_context
        from unittest import mock

        props = types.SimpleNamespace(name=GPU_NAME, major=GPU_CAPABILITY[0], minor=GPU_CAPABILITY[1],
                                      total_memory=GPU_MEMORY, multi_processor_count=GPU_SMS, uuid="fake")
        table: dict[str, Any] = {
            "is_available": lambda: True,
            # torch's C++ side calls this before the first CUDA tensor is made; the fake device needs no driver
            "_lazy_init": lambda: None,
            "device_count": lambda: self.devices,
            "is_bf16_supported": lambda *a, **k: True,
            "current_device": self.current_device,
            "set_device": self.set_device,
            "get_device_name": lambda d=None: (self.device_index(d), GPU_NAME)[1],
            "get_device_capability": lambda d=None: (self.device_index(d), GPU_CAPABILITY)[1],
            "get_device_properties": lambda d=None: (self.device_index(d), props)[1],
            "mem_get_info": lambda d=None: (GPU_MEMORY - 2**30, GPU_MEMORY),
            "synchronize": self.synchronize,
            "empty_cache": lambda: self.record("empty_cache", None),
            "memory_allocated": lambda d=None: 0,
            "max_memory_allocated": lambda d=None: 0,
            "reset_peak_memory_stats": lambda d=None: None,
            "Stream": FakeStream,
            "Event": FakeEvent,
            "CUDAGraph": FakeGraph,
            "graph": _GraphCapture,
            "current_stream": self.current_stream,
            "default_stream": self.default_stream,
            "stream": self.stream,
        }
        for name, value in table.items():
            p(mock.patch.object(c, name, value))

    def _patch_threads(self, s: contextlib.ExitStack) -> None:
        """Threads started while installed run in the mode too (dispatch modes are per thread)."""
        from unittest import mock

        original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]
        harness = self

        def bootstrap(thread: threading.Thread) -> None:
            if FakeCuda._current is harness:
                with _Mode(harness):
                    original(thread)
            else:
                original(thread)

        s.enter_context(mock.patch.object(threading.Thread, "_bootstrap_inner", bootstrap))

    def _patch_tensor(self, s: contextlib.ExitStack) -> None:
        from unittest import mock

        harness = self

        def numpy(t: torch.Tensor, *, force: bool = False) -> np.ndarray:
            if t.device.type != "cpu":
                # torch's own message for a CUDA tensor
                raise TypeError(f"can't convert {t.device} device type tensor to numpy. Use Tensor.cpu() to copy "
                                "the tensor to host memory first.")
            harness.record("to_host", None, shape=tuple(t.shape), via="numpy of a fake host tensor")
            return stand_in(tuple(t.shape), t.dtype).numpy()

        def record_stream(t: torch.Tensor, stream: Any) -> None:
            if not isinstance(stream, FakeStream):
                raise FakeCudaError(f"record_stream: expected a CUDA stream, got {stream!r}")
            if t.device != stream.device:
                raise FakeCudaError(f"record_stream: tensor on {t.device}, stream on {stream.device}")
            harness.record("record_stream", t.device, stream=stream.cuda_stream)

        original_save = torch.save

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            def host(x: Any) -> Any:
                if isinstance(x, FakeTensor):
                    harness.record("to_host", x.device, shape=tuple(x.shape), via="torch.save")
                    return stand_in(tuple(x.shape), x.dtype)
                return x

            original_save(pytree.tree_map(host, obj), f, *args, **kwargs)

        original_backward = torch.Tensor.backward

        def backward(t: torch.Tensor, gradient: Any = None, *args: Any, **kwargs: Any) -> None:
            if not isinstance(t, FakeTensor):
                return original_backward(t, gradient, *args, **kwargs)
            harness.fake_backward(t)
            return None

        s.enter_context(mock.patch.object(torch.Tensor, "backward", backward))
        s.enter_context(mock.patch.object(FakeTensor, "numpy", numpy, create=True))
        s.enter_context(mock.patch.object(torch.Tensor, "record_stream", record_stream))
        s.enter_context(mock.patch.object(torch, "save", save))

    def _patch_distributed(self, s: contextlib.ExitStack) -> None:
        from fake_nccl import install

        install(self, s)

    def _forget_product_caches(self) -> None:
        """The product keeps a few per-device objects for the process's life; fake ones must not outlive the
        harness (they would reach the next test's real CPU run)."""
        from capsule_batch import devices
        from capsule_batch.model import preprocess

        for key in [k for k in preprocess._NORMALISATION if str(k[0]).startswith("cuda")]:
            del preprocess._NORMALISATION[key]
        if hasattr(devices._local, "streams"):
            del devices._local.streams

    def fake_backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()` on the fake device: every leaf on the loss's graph gets a gradient of its own shape,
        dtype and device (accumulated as autograd does). autograd's engine itself cannot run here: before a backward
        pass it asks the CUDA driver about each device's context (GraphTask::stash_current_streams), and this
        machine has no driver."""
        if loss.grad_fn is None:
            raise RuntimeError("element 0 of tensors does not require grad and does not have a grad_fn")
        if loss.numel() != 1:
            raise RuntimeError("grad can be implicitly created only for scalar outputs")
        self.check_not_capturing("a backward pass")
        seen, todo, leaves = set(), [loss.grad_fn], []
        while todo:
            node = todo.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if hasattr(node, "variable"):
                leaves.append(node.variable)
            todo.extend(n for n, _ in node.next_functions)
        with torch.no_grad():
            for p in leaves:
                g = torch.zeros_like(p)
                p.grad = g if p.grad is None else p.grad + g
        self.record("backward", loss.device, leaves=len(leaves))

    # -- the log ------------------------------------------------------------------------------------------
    def record(self, what: str, device: Any, **details: Any) -> None:
        self.log.append((what, None if device is None else str(device), details))

    def count(self, what: str, **details: Any) -> int:
        return sum(1 for w, _, d in self.log if w == what and all(d.get(k) == v for k, v in details.items()))

    def entries(self, what: str) -> list[tuple[str, Any, dict[str, Any]]]:
        return [e for e in self.log if e[0] == what]

    # -- torch.cuda's doubles -----------------------------------------------------------------------------
    def device_index(self, device: Any = None) -> int:
        if device is None:
            return self.current_device()
        if isinstance(device, int):
            index = device
        else:
            d = torch.device(device)
            if d.type != "cuda":
                raise FakeCudaError(f"expected a CUDA device, got {d}")
            index = self.current_device() if d.index is None else d.index
        if not 0 <= index < self.devices:
            raise FakeCudaError(f"invalid device ordinal {index} ({self.devices} fake GPU(s))")
        return index

    def current_device(self) -> int:
        return getattr(self._tls, "device", 0)

    def set_device(self, device: Any) -> None:
        index = self.device_index(device)
        self._tls.device = index
        self.record("set_device", f"cuda:{index}", thread=threading.current_thread().name)

    def default_stream(self, device: Any = None) -> FakeStream:
        index = self.device_index(device)
        if index not in self._default_streams:
            self._default_streams[index] = FakeStream(index, harness=self, default=True)
        return self._default_streams[index]

    def current_stream(self, device: Any = None) -> FakeStream:
        index = self.device_index(device)
        streams = getattr(self._tls, "streams", {})
        return streams.get(index) or self.default_stream(index)

    @contextlib.contextmanager
    def stream(self, stream: FakeStream | None) -> Iterator[None]:
        """torch.cuda.stream: `stream` current on its device (and its device current) while inside."""
        if stream is None:
            yield
            return
        self._check_stream(stream)
        streams = self._tls.__dict__.setdefault("streams", {})
        before_stream, before_device = streams.get(stream.device_index), self.current_device()
        streams[stream.device_index] = stream
        self._tls.device = stream.device_index
        try:
            yield
        finally:
            if before_stream is None:
                streams.pop(stream.device_index, None)
            else:
                streams[stream.device_index] = before_stream
            self._tls.device = before_device

    def synchronize(self, device: Any = None) -> None:
        self.check_not_capturing("torch.cuda.synchronize")
        self.record("synchronize", f"cuda:{self.device_index(device)}")

    def check_not_capturing(self, what: str) -> None:
        if getattr(self._tls, "capturing", False):
            raise FakeCudaError(f"{what} during CUDA graph capture: operation not permitted when stream is "
                                "capturing (cudaErrorStreamCaptureUnsupported)")

    def _check_stream(self, stream: Any) -> None:
        if not isinstance(stream, FakeStream):
            raise FakeCudaError(f"expected a CUDA stream, got {stream!r}")

    def is_pinned(self, t: Any) -> bool:
        ref = self._pinned.get(id(t))
        return ref is not None and ref() is t

    def _pin(self, t: torch.Tensor) -> None:
        self._pinned[id(t)] = weakref.ref(t)

    # -- tensors ------------------------------------------------------------------------------------------
    def _dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """One aten call: real unless it touches CUDA; host<->device crossings logged (and stood in for)."""
        flat = pytree.arg_tree_leaves(*args, **kwargs)
        if not any(isinstance(t, FakeTensor) for t in flat):
            return self._host_call(func, args, kwargs)
        if func is aten._local_scalar_dense.default:  # .item(), float(t), bool(t)
            t = args[0]
            self.check_not_capturing("reading a CUDA value on the host (.item())")
            self.record("to_host", t.device, shape=(), via="item")
            return stand_in((), t.dtype).item()
        if func is aten.index.Tensor and _leading_bool_mask(args):
            # x[mask]: the result's length is the mask's count, which the host must read from the device (a
            # synchronisation on a real GPU, logged); the stand-in count is "every element selected"
            x, mask = args[0], args[1][0]
            self.check_not_capturing("a boolean-mask index (data-dependent shape)")
            self.record("sync", x.device, via="boolean mask index", shape=tuple(mask.shape))
            return self._fake_call(aten.reshape.default, (x, (-1, *x.shape[mask.dim():])), {})
        if func is aten._to_copy.default and kwargs.get("device") is not None and not _is_cuda_spec(kwargs["device"]):
            t = args[0]  # t.to("cpu") / t.cpu()
            self.check_not_capturing("a copy to the host")
            self.record("to_host", t.device, shape=tuple(t.shape), via="to", non_blocking=_non_blocking(args, kwargs))
            return stand_in(tuple(t.shape), kwargs.get("dtype") or t.dtype)
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if not isinstance(dst, FakeTensor):  # host_tensor.copy_(cuda_tensor)
                self.check_not_capturing("a copy to the host")
                with torch.no_grad():
                    dst.copy_(stand_in(tuple(dst.shape), dst.dtype))
                self.record("to_host", src.device, shape=tuple(src.shape), via="copy_", pinned=self.is_pinned(dst),
                            non_blocking=_non_blocking(args, kwargs))
                return dst
            if not isinstance(src, FakeTensor):  # cuda_tensor.copy_(host_tensor)
                self.record("to_device", dst.device, shape=tuple(src.shape), dtype=src.dtype,
                            pinned=self.is_pinned(src), non_blocking=_non_blocking(args, kwargs))
        return self._fake_call(func, args, kwargs)

    def _host_call(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """A call on real tensors: pinned memory remembered, an upload logged and made fake, the rest real."""
        if func is aten.is_pinned.default:
            return self.is_pinned(args[0])
        if func is aten._pin_memory.default:
            out = args[0].clone()
            self._pin(out)
            return out
        to_cuda = _is_cuda_spec(kwargs.get("device"))
        if kwargs.get("pin_memory") and not to_cuda:  # pinned host memory: real memory, remembered as pinned
            out = func(*args, **{**kwargs, "pin_memory": False})
            self._pin(out)
            return out
        if not to_cuda:
            return func(*args, **kwargs)
        if func is aten._to_copy.default:  # host_tensor.to("cuda")
            src = args[0]
            self.record("to_device", kwargs["device"], shape=tuple(src.shape), dtype=kwargs.get("dtype") or src.dtype,
                        pinned=self.is_pinned(src), non_blocking=_non_blocking(args, kwargs))
        return self._fake_call(func, args, kwargs)

    def _fake_call(self, func: Any, args: tuple, kwargs: dict) -> Any:
        with self.lock, self.fake:
            return func(*args, **kwargs)


def _leading_bool_mask(args: tuple) -> bool:
    """aten.index(x, [mask]) with one boolean mask over x's leading dimensions."""
    indices = args[1] if len(args) > 1 else None
    return (isinstance(indices, (list, tuple)) and len(indices) == 1 and isinstance(indices[0], torch.Tensor)
            and indices[0].dtype == torch.bool and tuple(indices[0].shape) == tuple(args[0].shape[:indices[0].dim()]))


def _non_blocking(args: tuple, kwargs: dict) -> bool:
    """copy_(dst, src, non_blocking) / _to_copy(..., non_blocking=)"""
    return bool(args[2] if len(args) > 2 else kwargs.get("non_blocking"))
