"""Custom all-reduce over CUDA IPC for the ranks of one node (DESIGN s4).

`CustomAllReduce` owns one workspace per rank: a plain ``cudaMalloc`` (IPC handles fail on
memory from torch's expandable segments or stream-ordered pools) holding a flag area, two
data buffers of `capacity_bytes` used by alternate calls, and two push buffers (a slot of
`push_bytes` per rank in each). IPC handles are exchanged over MPI
once and every peer's workspace is mapped. The kernels are in ``cpp/custom_allreduce.cu``;
they compile at first use through CuPy's NVRTC (cached by CuPy), one build per world size,
and run on torch's current stream, so they can be captured in CUDA graphs. The protocol is
described at the top of the .cu file.

- one-shot: every rank copies its input into its buffer, signals, waits for all, and sums
  every rank's buffer itself (least latency: small messages).
- two-shot: reduce-scatter (rank q sums slice q of every buffer), then all-gather of the
  reduced slices (each rank reads 2/N of the message from peers instead of all of it).
- push: a one-shot without the barrier, for float16 / bfloat16 up to `push_bytes`: every
  rank stores its message into every rank's push buffer, and the data's arrival is the
  signal (the buffers hold -0 between calls, which is never pushed); no rank reads peer
  memory, so a call costs one one-way trip over NVLink instead of the barrier's and the
  reads' round trips.
- one-shot or push with the residual add and RMSNorm after it (`all_reduce_add_rms_norm`): a
  row layer's output goes into the next norm without a kernel of its own (`add_norm_fits`).

Sums run over ranks in rank order, in fp32, so every rank gets bitwise the same result.
Every wait in a kernel is bounded by `timeout_s`: a rank that does not join makes the others
record it in host-mapped memory; `check()` (called before every launch) then raises
`CustomAllReduceError` naming it, and the workspace stays unusable.

Which path `NcclCommunicator.all_reduce` takes is decided by `choose_all_reduce`, a pure
function with the measured thresholds (`THRESHOLDS`, from benchmarks/bench_allreduce.py).
"""

from __future__ import annotations

import collections.abc
import ctypes
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tpquant.kernels import pdl
from tpquant.kernels.cupy_launch import launch

Environ = collections.abc.Mapping  # Mapping[str, str]

ALGORITHMS = ("oneshot", "twoshot", "push")
MODES = ("auto", "nccl", *ALGORITHMS)
MODE_ENV = "TPQUANT_ALLREDUCE"
NORM_ENV = "TPQUANT_ALLREDUCE_NORM"  # "0": no fused all-reduce + RMSNorm (benchmarks compare)
MAX_RANKS = 8  # TPQ_MAX_RANKS in the .cu; checked against the compiled layout at start-up
NORM_MAX_ROW_BYTES = 32 << 10  # the fused norm's longest row (TPQ_NORM_PACKS x 512 threads
# x 16 bytes in the .cu; checked likewise): hidden 16384 in float16 / bfloat16
DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
PUSH_DTYPES = (torch.float16, torch.bfloat16)  # the push kernels' sentinel is -0 in 16 bits
PUSH_MAX_BYTES = 512 << 10  # TPQ_PUSH_BYTES in the .cu (checked): a decode batch of 64 x 4096

DEFAULT_CAPACITY_BYTES = 16 << 20  # largest message; the workspace holds two of these
DEFAULT_TIMEOUT_S = 30.0  # a peer late by more than this is taken for gone

SOURCE = Path(__file__).resolve().parents[2] / "cpp" / "custom_allreduce.cu"

_HOST_ALLOC_PORTABLE_MAPPED = 0x1 | 0x2  # cudaHostAllocPortable | cudaHostAllocMapped


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Message sizes (bytes) where the paths cross over, for one world size, and the kernels'
    thread blocks per launch (512 threads each, at most TPQ_MAX_BLOCKS).

    One-shot up to `oneshot_max_bytes`, two-shot above it up to `custom_max_bytes`,
    NCCL beyond (and always beyond the workspace).
    """

    oneshot_max_bytes: int
    custom_max_bytes: int
    max_blocks: int = 36


# Measured by benchmarks/bench_allreduce.py on 4 x H200 (NVLink), bf16, 2026-11-22
# (docs/benchmarks.md): at 2 ranks one-shot beats two-shot at every size and NCCL up to 8 MiB;
# at 4 ranks one-shot wins to 512 KiB, two-shot to 4 MiB, NCCL above. 8 ranks: not measured
# (no 8-GPU machine was lent), scaled from the 4-rank crossover.
# Blocks per launch (2 x H200, 2026-11-29, `bench_allreduce.py --max-blocks 36/48/64`): at 2
# ranks 64 blocks took one-shot at 512 KiB from 7.6 to 6.9 us (NCCL 15.3-15.7), at 1 MiB from
# 10.4 to 8.7 us, and left 4-256 KiB unchanged; at 4 ranks 64 was no better (0.53x NCCL at
# 512 KiB against 0.51x, 2026-11-22), so 36 stays.
THRESHOLDS: dict[int, Thresholds] = {
    2: Thresholds(oneshot_max_bytes=8 << 20, custom_max_bytes=8 << 20, max_blocks=64),
    4: Thresholds(oneshot_max_bytes=512 << 10, custom_max_bytes=4 << 20),
    8: Thresholds(oneshot_max_bytes=256 << 10, custom_max_bytes=2 << 20),
}


def thresholds_for(world_size: int) -> Thresholds:
    """The thresholds measured at the smallest tabled world size >= `world_size`."""
    for size in sorted(THRESHOLDS):
        if size >= world_size:
            return THRESHOLDS[size]
    return THRESHOLDS[max(THRESHOLDS)]


def all_reduce_mode(option: str | None, env: Environ[str, str]) -> str:
    """The all-reduce mode: `option` if given, else ``$TPQUANT_ALLREDUCE``, else "auto".

    "auto" picks by size (`choose_all_reduce`); "nccl" never uses the custom kernels;
    "oneshot" / "twoshot" force that kernel wherever it can run (NCCL elsewhere).
    """
    source, value = ("all_reduce", option) if option is not None else (MODE_ENV, env.get(MODE_ENV))
    if value is None or value == "":
        return "auto"
    if not isinstance(value, str) or value.lower() not in MODES:
        raise ValueError(f"{source}={value!r} is not an all-reduce mode; use one of {MODES}")
    return value.lower()


def add_norm_wanted(env: Environ[str, str]) -> bool:
    """``$TPQUANT_ALLREDUCE_NORM``: "1" (default) fuses a row layer's all-reduce with the
    residual add and RMSNorm after it where it can, "0" never does."""
    value = env.get(NORM_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{NORM_ENV}={value!r}: use 1 (fuse the norm, the default) or 0")
    return value == "1"


def choose_all_reduce(
    mode: str,
    *,
    nbytes: int,
    world_size: int,
    dtype: torch.dtype,
    op: str,
    contiguous: bool,
    custom_available: bool,
    capacity_bytes: int,
    push_bytes: int = PUSH_MAX_BYTES,
) -> str:
    """"oneshot", "twoshot", "push" or "nccl" for one all-reduce: the one place for this rule.

    NCCL whenever the custom kernels cannot run: no usable workspace (`custom_available`
    False: peers cannot reach each other, or mode "nccl"), op other than "sum", a dtype other
    than float32/float16/bfloat16, a non-contiguous tensor, more than `capacity_bytes`, or
    more than MAX_RANKS ranks. Otherwise a forced mode wins where it can run ("push": float16
    / bfloat16 up to `push_bytes`; NCCL elsewhere), and "auto" compares `nbytes` with
    `thresholds_for(world_size)`, taking push for the one-shot sizes push can run.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    custom_ok = (
        mode != "nccl"
        and custom_available
        and op == "sum"
        and dtype in DTYPES
        and contiguous
        and nbytes <= capacity_bytes
        and 2 <= world_size <= MAX_RANKS
    )
    if not custom_ok:
        return "nccl"
    push_ok = dtype in PUSH_DTYPES and nbytes <= push_bytes
    if mode == "push":
        return "push" if push_ok else "nccl"
    if mode in ALGORITHMS:
        return mode
    limits = thresholds_for(world_size)
    if nbytes <= limits.oneshot_max_bytes:
        return "push" if push_ok else "oneshot"
    if nbytes <= limits.custom_max_bytes:
        return "twoshot"
    return "nccl"


def launch_blocks(
    numel: int, itemsize: int, world_size: int, algorithm: str, threads: int, max_blocks: int
) -> int:
    """Thread blocks of one launch: one 16-byte pack per thread (of one slice for two-shot).

    Every rank must launch the same grid (block b meets block b of every peer), so this
    depends only on arguments that are equal on all ranks.
    """
    packs = -(-numel * itemsize // 16)
    work = -(-packs // world_size) if algorithm == "twoshot" else packs
    return max(1, min(max_blocks, -(-work // threads)))


def add_norm_fits(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `CustomAllReduce.all_reduce_add_rms_norm` takes these tensors: one dtype of
    DTYPES, residual shaped like partial, weight [hidden], all contiguous and 16-byte aligned,
    and rows a whole number of 16-byte packs (the kernel moves whole packs) of at most
    NORM_MAX_ROW_BYTES (a row lives in one block's registers)."""
    hidden = partial.shape[-1] if partial.dim() > 0 else 0
    tensors = (partial, residual, weight)
    return (
        partial.dtype in DTYPES
        and residual.dtype == weight.dtype == partial.dtype
        and residual.shape == partial.shape
        and tuple(weight.shape) == (hidden,)
        and hidden > 0
        and hidden * partial.element_size() % 16 == 0
        and hidden * partial.element_size() <= NORM_MAX_ROW_BYTES
        and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors)
    )


def add_norm_pays(rows: int, row_bytes: int, world_size: int, threads: int,
                  max_blocks: int) -> bool:
    """Whether the fused all-reduce + RMSNorm (a block per row) beats the one-shot all-reduce
    followed by the norm kernel: where it launches at least as many blocks as that one-shot
    would, which needs rows <= max_blocks. A block reads its peers' packs at a bounded rate,
    so fewer blocks than the plain one-shot's lose (2 x H200, bf16: rows of 16 KiB took 7.1
    against 6.5 us at 1 row, 7.3 against 6.9 at 8; 512 rows of 8 KiB 25.0 against 23.1 us),
    and as many win (8 KiB rows 0.94-0.97x at 1-64 rows, 16 KiB 0.90x at 64; docs/benchmarks.md)."""
    plain = launch_blocks(rows * row_bytes, 1, world_size, "oneshot", threads, max_blocks)
    return plain <= rows <= max_blocks


class CustomAllReduceError(RuntimeError):
    """A custom all-reduce timed out waiting for the ranks in `peers`."""

    def __init__(self, rank: int, peers: list[int], timeout_s: float) -> None:
        self.rank, self.peers, self.timeout_s = rank, peers, timeout_s
        super().__init__(
            f"custom all-reduce on rank {rank}: timed out after {timeout_s:g} s waiting for "
            f"rank(s) {peers}, which did not join the same all-reduce (stopped, crashed, or "
            "called collectives in another order); this communicator cannot be used again"
        )


class CudaError(RuntimeError):
    """A CUDA call made here failed; the message names the call and the line."""


def _cuda(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call a CuPy CUDA function; on failure raise CudaError naming it and the caller's line."""
    import cupy

    errors = (cupy.cuda.runtime.CUDARuntimeError, cupy.cuda.driver.CUDADriverError)
    try:
        return fn(*args)
    except errors as e:
        frame = sys._getframe(1)
        where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        raise CudaError(f"{what} failed at {where}: {e}") from e


class CustomAllReduce:
    """IPC-workspace all-reduce over the ranks of `mpi_comm` (all on one node), one GPU each.

    Construction is collective. All ranks must pass the same arguments. When the ranks
    cannot reach each other's memory (several nodes, IPC refused, or a probe value that does
    not read back), `reachable` is False, `unreachable_reason` says why, and nothing is held.

    all_reduce works in place on contiguous float32/float16/bfloat16 CUDA tensors of at most
    `capacity_bytes`, on torch's current stream, without host synchronization, and allocates
    nothing (so it can be captured in a CUDA graph). Calls of one workspace must be issued in
    the same order on every rank and must not overlap (one stream at a time), as for NCCL.
    """

    def __init__(
        self,
        mpi_comm: Any,
        device: torch.device | str,
        *,
        capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_blocks: int | None = None,
    ) -> None:
        self.mpi_comm = mpi_comm
        self.rank, self.world_size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        if not 2 <= self.world_size <= MAX_RANKS:
            raise ValueError(f"CustomAllReduce needs 2 to {MAX_RANKS} ranks, got {self.world_size}")
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
            raise TypeError(f"capacity_bytes must be an int, got {capacity_bytes!r}")
        if capacity_bytes < 16:
            raise ValueError(f"capacity_bytes must be at least 16, got {capacity_bytes}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_blocks is None:
            max_blocks = thresholds_for(self.world_size).max_blocks
        if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1:
            raise ValueError(f"max_blocks must be a positive int, got {max_blocks!r}")
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CustomAllReduce needs a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.capacity_bytes = -(-capacity_bytes // 256) * 256
        self.timeout_s = float(timeout_s)
        self.max_blocks = max_blocks
        self.reachable = False
        self.unreachable_reason: str | None = None
        self._ptr = 0  # this rank's workspace
        self._peer_ptrs: dict[int, int] = {}  # peers' workspaces, mapped here
        self._err_ptr = 0  # host-mapped error words
        self._err: Any = None  # their ctypes view
        self._closed = False

        import cupy

        self._cupy = cupy
        self._cp_device = cupy.cuda.Device(device.index)
        error = None
        try:
            with self._cp_device:
                self._compile()
                self._allocate()
        except Exception as e:  # noqa: BLE001 - agreed on below, then raised on every rank
            error = e
        self._agree_or_raise(error, "compiling the kernels or allocating the workspace")
        self._connect()
        if self.reachable:
            self._self_test()

    # ---- set-up -------------------------------------------------------------------------

    def _compile(self) -> None:
        if not SOURCE.is_file():
            raise FileNotFoundError(
                f"{SOURCE} not found: tpquant's CUDA sources come with a source checkout "
                "(pip install -e .)"
            )
        module = self._cupy.RawModule(
            code=SOURCE.read_text(),
            options=("-std=c++17", f"-DTPQ_WORLD={self.world_size}"),
        )
        self._kernels = {
            (algo, dtype): _cuda(f"loading {name}", module.get_function, name)
            for algo, prefix in (("oneshot", "tpq_one_shot_"), ("twoshot", "tpq_two_shot_"))
            for dtype, suffix in DTYPES.items()
            for name in [prefix + suffix]
        }
        self._kernels.update({
            ("push", dtype): _cuda(f"loading {name}", module.get_function, name)
            for dtype in PUSH_DTYPES for name in ["tpq_push_" + DTYPES[dtype]]
        })
        self._add_norm_kernels = {
            (algo, dtype): _cuda(f"loading {name}", module.get_function, name)
            for algo, prefix in (("oneshot", "tpq_add_norm_"), ("push", "tpq_push_add_norm_"))
            for dtype, suffix in DTYPES.items() if algo == "oneshot" or dtype in PUSH_DTYPES
            for name in [prefix + suffix]
        }
        self._clear_kernel = _cuda("loading tpq_push_clear", module.get_function,
                                   "tpq_push_clear")
        self._probe_kernel = _cuda("loading tpq_probe", module.get_function, "tpq_probe")
        layout = torch.zeros(9, dtype=torch.int64, device=self.device)
        kernel = _cuda("loading tpq_layout", module.get_function, "tpq_layout")
        self._launch(kernel, 1, 1, (np.uint64(layout.data_ptr()),))
        # self.threads: per block, every kernel here
        (self._ctrl_bytes, max_ranks, self._max_grid, self.threads, self._probe_off,
         self._reached_off, self._seen_off, norm_row_bytes, push_bytes) = layout.cpu().tolist()
        if max_ranks != MAX_RANKS:
            raise RuntimeError(f"{SOURCE.name} has TPQ_MAX_RANKS={max_ranks}, Python {MAX_RANKS}")
        if norm_row_bytes != NORM_MAX_ROW_BYTES:
            raise RuntimeError(f"{SOURCE.name}'s fused norm takes rows of {norm_row_bytes} "
                               f"bytes, Python NORM_MAX_ROW_BYTES={NORM_MAX_ROW_BYTES}")
        if push_bytes != PUSH_MAX_BYTES:
            raise RuntimeError(f"{SOURCE.name} has push slots of {push_bytes} bytes, Python "
                               f"PUSH_MAX_BYTES={PUSH_MAX_BYTES}")
        self.push_bytes = push_bytes
        self.max_blocks = min(self.max_blocks, self._max_grid)

    def _allocate(self) -> None:
        rt = self._cupy.cuda.runtime
        push_at = self._ctrl_bytes + 2 * self.capacity_bytes
        push_size = 2 * self.world_size * self.push_bytes
        self._ptr = _cuda("cudaMalloc of the workspace", rt.malloc, push_at + push_size)
        _cuda("cudaMemset of the flag area", rt.memset, self._ptr, 0, self._ctrl_bytes)
        # every push slot empty before any peer can push (the barriers in _connect come later)
        self._launch(self._clear_kernel, 64, 512, (np.uint64(self._ptr + push_at),
                                                   np.int64(push_size // 4)))
        _cuda("cudaDeviceSynchronize", rt.deviceSynchronize)
        words = MAX_RANKS + 1  # one per peer, then "some wait timed out"
        self._err_ptr = _cuda("cudaHostAlloc of the error words", rt.hostAlloc, 4 * words,
                              _HOST_ALLOC_PORTABLE_MAPPED)
        ctypes.memset(self._err_ptr, 0, 4 * words)
        # With unified addressing (every 64-bit CUDA platform) the host pointer of mapped
        # pinned memory is also its device pointer.
        self._err = (ctypes.c_uint32 * words).from_address(self._err_ptr)

    def _agreed(self, ok: bool) -> list[bool]:
        """Every rank's `ok` (an MPI Allgather: every rank must call it at the same point)."""
        mine = np.array([int(ok)], dtype=np.int32)
        every = np.empty(self.world_size, dtype=np.int32)
        self.mpi_comm.Allgather(mine, every)
        return [bool(v) for v in every]

    def _agree_or_raise(self, error: BaseException | None, what: str) -> None:
        oks = self._agreed(error is None)
        if all(oks):
            return
        self._release_collective()  # every rank is here, so its barriers are safe
        if error is not None:
            raise RuntimeError(f"custom all-reduce on rank {self.rank}: {what} failed: {error}") \
                from error
        bad = [r for r, ok in enumerate(oks) if not ok]
        raise RuntimeError(f"custom all-reduce: {what} failed on rank(s) {bad} (see their error)")

    def _connect(self) -> None:
        """Map every peer's workspace and prove, by a value written and read back, that it works."""
        from mpi4py import MPI

        rt = self._cupy.cuda.runtime
        node = self.mpi_comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        one_node = node.Get_size() == self.world_size
        node.Free()
        if not all(self._agreed(one_node)):
            return self._unreachable("the ranks are not all on one node")

        error = None
        handle = np.zeros(64, dtype=np.uint8)
        try:
            with self._cp_device:
                raw = _cuda("cudaIpcGetMemHandle", rt.ipcGetMemHandle, self._ptr)
            handle[:] = np.frombuffer(raw, dtype=np.uint8)
        except Exception as e:  # noqa: BLE001 - agreed on below
            error = e
        self._agree_or_raise(error, "exporting the workspace's IPC handle")
        handles = np.empty((self.world_size, 64), dtype=np.uint8)
        self.mpi_comm.Allgather(handle, handles)

        opened_all = True
        with self._cp_device:
            for q in range(self.world_size):
                if q == self.rank:
                    continue
                try:
                    self._peer_ptrs[q] = rt.ipcOpenMemHandle(handles[q].tobytes(),
                                                             rt.cudaIpcMemLazyEnablePeerAccess)
                except Exception as e:  # noqa: BLE001 - a refused handle means "unreachable"
                    opened_all = False
                    self.unreachable_reason = (
                        f"rank {self.rank} cannot open rank {q}'s IPC handle: {e}"
                    )
        oks = self._agreed(opened_all)
        if not all(oks):
            bad = [r for r, ok in enumerate(oks) if not ok]
            return self._unreachable(f"rank(s) {bad} cannot map a peer's workspace")

        # Probe: rank r's workspace holds nonce + r + 1; every rank reads every probe and
        # writes its own mark into every workspace; both must be what was written.
        nonce = np.zeros(1, dtype=np.uint64)
        if self.rank == 0:
            nonce[0] = np.random.default_rng().integers(1, 1 << 62, dtype=np.uint64)
        self.mpi_comm.Bcast(nonce, root=0)
        expected = [int(nonce[0]) + q + 1 for q in range(self.world_size)]
        error = None
        try:
            with self._cp_device:
                value = np.array([expected[self.rank]], dtype=np.uint64)
                _cuda("cudaMemcpy of the probe value", rt.memcpy, self._ptr + self._probe_off,
                      value.ctypes.data, 8, rt.memcpyHostToDevice)
                _cuda("cudaDeviceSynchronize", rt.deviceSynchronize)
        except Exception as e:  # noqa: BLE001 - agreed on below
            error = e
        self._agree_or_raise(error, "writing the probe value")
        self.mpi_comm.Barrier()
        try:
            with self._cp_device:
                mark = np.uint64(expected[self.rank])
                args = (*self._workspace_args(), np.int32(self.rank), mark)
                self._launch(self._probe_kernel, 1, 32, args)
                _cuda("cudaDeviceSynchronize", rt.deviceSynchronize)
        except Exception as e:  # noqa: BLE001 - agreed on below
            error = e
        self._agree_or_raise(error, "running the peer probe")
        self.mpi_comm.Barrier()  # every rank's marks are written
        seen = np.zeros(MAX_RANKS, dtype=np.uint64)
        reached = np.zeros(MAX_RANKS, dtype=np.uint64)
        try:
            with self._cp_device:
                _cuda("cudaMemcpy of the probe results", rt.memcpy, seen.ctypes.data,
                      self._ptr + self._seen_off, 8 * MAX_RANKS, rt.memcpyDeviceToHost)
                _cuda("cudaMemcpy of the probe results", rt.memcpy, reached.ctypes.data,
                      self._ptr + self._reached_off, 8 * MAX_RANKS, rt.memcpyDeviceToHost)
        except Exception as e:  # noqa: BLE001 - agreed on below
            error = e
        self._agree_or_raise(error, "reading the probe results")
        n = self.world_size
        ok = seen[:n].tolist() == expected and reached[:n].tolist() == expected
        if not ok:
            self.unreachable_reason = (
                f"rank {self.rank} read {seen[:n].tolist()} and received {reached[:n].tolist()} "
                f"where {expected} was written"
            )
        oks = self._agreed(ok)
        if not all(oks):
            bad = [r for r, ok in enumerate(oks) if not ok]
            return self._unreachable(f"peer memory does not read back on rank(s) {bad}")
        self.reachable = True
        timeout_ns = np.uint64(int(self.timeout_s * 1e9))
        self._tail = (*self._workspace_args(), np.int32(self.rank), np.int64(self.capacity_bytes),
                      timeout_ns, np.uint64(self._err_ptr))

    def _unreachable(self, reason: str) -> None:
        self.unreachable_reason = self.unreachable_reason or reason
        self._release_collective()

    def _self_test(self) -> None:
        """Run every kernel once: all-reduces of 5 elements (a partial pack), sums that must be
        exact, and the fused norm on one row.

        It also loads every kernel before any CUDA-graph capture can need it.
        """
        error = None
        try:
            want = self.world_size * (self.world_size + 1) // 2
            got, norms = [], []
            for dtype in DTYPES:
                algos = [a for a in ALGORITHMS if a != "push" or dtype in PUSH_DTYPES]
                for algo in algos:
                    t = torch.full((5,), float(self.rank + 1), dtype=dtype, device=self.device)
                    got.append(self.all_reduce(t, algo))
                # the fused norm on one row, residual 1: s = want + 1 exactly, s / rms(s) ~ 1
                # a list, not a set: every rank must call them in the same order
                for algo in [a for a in ("oneshot", "push") if a in algos]:
                    row = torch.full((64,), float(self.rank + 1), dtype=dtype,
                                     device=self.device)
                    s, normed = self.all_reduce_add_rms_norm(row, torch.ones_like(row),
                                                             torch.ones_like(row), 0.0, algo)
                    got.append(s - 1)
                    norms.append(normed)
            self.synchronize()
            wrong = [(tuple(t.tolist()), t.dtype) for t in got if not bool((t == want).all())]
            wrong += [(tuple(t.tolist()), t.dtype) for t in norms
                      if not bool(((t.float() - 1).abs() < 1e-2).all())]
            if wrong:
                error = RuntimeError(f"self-test sums are wrong, want {want}: {wrong}")
        except Exception as e:  # noqa: BLE001 - agreed on below
            error = e
        oks = self._agreed(error is None)
        if not all(oks):
            self._release_collective()
        if error is not None:
            raise RuntimeError(f"custom all-reduce on rank {self.rank}: self-test: {error}") \
                from error
        if not all(oks):
            bad = [r for r, ok in enumerate(oks) if not ok]
            raise RuntimeError(f"custom all-reduce: self-test failed on rank(s) {bad}")

    # ---- running ------------------------------------------------------------------------

    def _workspace_args(self) -> tuple[np.uint64, ...]:
        ptrs = [self._peer_ptrs.get(q, self._ptr) for q in range(self.world_size)]
        ptrs += [0] * (MAX_RANKS - self.world_size)
        return tuple(np.uint64(p) for p in ptrs)

    def _launch(self, kernel: Any, blocks: int, threads: int, args: tuple,
                with_pdl: bool = False) -> None:
        _cuda(f"launching {kernel.name}", launch, kernel, (blocks,), (threads,), args, self.device,
              with_pdl)

    def all_reduce(self, t: torch.Tensor, algorithm: str = "oneshot") -> torch.Tensor:
        """Sum `t` over all ranks, in place, with "oneshot", "twoshot" or "push" (float16 /
        bfloat16 up to `push_bytes`); returns `t`."""
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        self._check_input(t)
        if algorithm == "push":
            self._check_push(t)
        if t.numel() == 0:
            return t
        blocks = launch_blocks(t.numel(), t.element_size(), self.world_size, algorithm,
                               self.threads, self.max_blocks)
        ptr = np.uint64(t.data_ptr())
        args = (ptr, ptr, np.int64(t.numel()), *self._tail)  # in place: in = out
        self._launch(self._kernels[(algorithm, t.dtype)], blocks, self.threads, args,
                     pdl.enabled(self.device))
        return t

    def all_reduce_add_rms_norm(
        self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
        algorithm: str = "oneshot",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, RMSNorm(s) * weight) with s = residual + the sum of `partial` over all ranks: a
        row layer's all-reduce, the residual add and the next norm in one kernel, its
        all-reduce a "oneshot" or a "push" (float16 / bfloat16 up to `push_bytes`).

        The same numbers as `all_reduce(partial, "oneshot")` followed by
        `tpquant.kernels.norm.add_rms_norm` (s bitwise, but for the sign of a zero under push;
        the norm up to the order of its sum of squares), and bitwise the same on every rank. `add_norm_fits` says which tensors it
        takes; `partial` is left as it was.
        """
        if algorithm not in ("oneshot", "push"):
            raise ValueError(f"algorithm must be 'oneshot' or 'push', got {algorithm!r}")
        self._check_input(partial)
        if algorithm == "push":
            self._check_push(partial)
        if not add_norm_fits(partial, residual, weight):
            raise ValueError(
                "custom all-reduce + RMSNorm takes contiguous, 16-byte aligned tensors of one "
                f"dtype, partial and residual alike, weight [hidden], rows of whole 16-byte "
                f"packs up to {NORM_MAX_ROW_BYTES} bytes; got partial "
                f"{tuple(partial.shape)} {partial.dtype}, residual {tuple(residual.shape)} "
                f"{residual.dtype}, weight {tuple(weight.shape)} {weight.dtype}"
            )
        if residual.device != self.device or weight.device != self.device:
            raise ValueError(f"CustomAllReduce is on {self.device}, the tensors are not")
        s, out = torch.empty_like(residual), torch.empty_like(residual)
        if partial.numel() == 0:
            return s, out
        hidden = partial.shape[-1]
        blocks = max(1, min(self.max_blocks, partial.numel() // hidden))  # whole rows a block
        args = (np.uint64(partial.data_ptr()), np.uint64(out.data_ptr()),
                np.int64(partial.numel()), *self._tail, np.uint64(residual.data_ptr()),
                np.uint64(s.data_ptr()), np.uint64(weight.data_ptr()), np.int64(hidden),
                np.float32(eps))
        self._launch(self._add_norm_kernels[(algorithm, partial.dtype)], blocks, self.threads,
                     args, pdl.enabled(self.device))
        return s, out

    def _check_input(self, t: torch.Tensor) -> None:
        """Raise unless this workspace can run and takes `t` (before any launch)."""
        self.check()
        if not self.reachable or self._closed:
            why = "closed" if self.reachable else f"peers unreachable: {self.unreachable_reason}"
            raise RuntimeError(f"custom all-reduce on rank {self.rank} cannot run ({why})")
        if t.device != self.device:
            raise ValueError(f"CustomAllReduce is on {self.device}, the tensor on {t.device}")
        if t.dtype not in DTYPES:
            raise TypeError(f"custom all-reduce takes {list(DTYPES)}, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError("custom all-reduce needs a contiguous tensor")
        nbytes = t.numel() * t.element_size()
        if nbytes > self.capacity_bytes:
            raise ValueError(
                f"custom all-reduce: {nbytes} bytes exceed the workspace's {self.capacity_bytes}"
            )

    def _check_push(self, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if t.dtype not in PUSH_DTYPES or nbytes > self.push_bytes:
            raise ValueError(
                f"the push all-reduce takes float16 / bfloat16 up to {self.push_bytes} bytes, "
                f"got {t.dtype}, {nbytes} bytes"
            )

    def check(self) -> None:
        """Raise CustomAllReduceError if a kernel of this workspace timed out (a cheap read)."""
        err = self._err
        if err is not None and err[MAX_RANKS]:
            peers = [q for q in range(self.world_size) if err[q]]
            raise CustomAllReduceError(self.rank, peers, self.timeout_s)

    def synchronize(self) -> None:
        """Wait for the work queued on torch's current stream, then check()."""
        torch.cuda.current_stream(self.device).synchronize()
        self.check()

    # ---- tear-down ----------------------------------------------------------------------

    def close(self) -> None:
        """Unmap the peers' workspaces and free this one. Collective; idempotent."""
        if self._closed:
            return
        if self.reachable:
            torch.cuda.synchronize(self.device)
        self._release_collective()

    def _release_collective(self) -> None:
        self.mpi_comm.Barrier()  # no peer still reads or writes our workspace
        rt = self._cupy.cuda.runtime
        with self._cp_device:
            for ptr in self._peer_ptrs.values():
                _cuda("cudaIpcCloseMemHandle", rt.ipcCloseMemHandle, ptr)
        self._peer_ptrs = {}
        self.mpi_comm.Barrier()  # no peer still maps our workspace
        self._release_local()

    def _release_local(self) -> None:
        rt = self._cupy.cuda.runtime
        self._closed = True
        self._err = None
        with self._cp_device:
            if self._ptr:
                _cuda("cudaFree of the workspace", rt.free, self._ptr)
                self._ptr = 0
            if self._err_ptr:
                _cuda("cudaFreeHost of the error words", rt.freeHost, self._err_ptr)
                self._err_ptr = 0
