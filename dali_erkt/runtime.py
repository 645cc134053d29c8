"""The runtime: device, precision, compilation and process group, resolved once at the edge.

A command resolves `RunConfig` into a `Runtime` with `resolve_runtime` and passes it down; the
library never looks at `run.device` or `run.precision` again.

Precision: Ampere and newer GPUs get bf16 (fp32's range, no loss scaling). Turing and older, such
as the paper's RTX 2060, have fast fp16 but no fast bf16, so they get fp16 with a GradScaler.
The CPU gets fp32 unless bf16 is asked for.

Processes: under `torchrun` (WORLD_SIZE > 1) each process gets its rank's device (cuda:LOCAL_RANK,
or the CPU) and the process group is started with the backend that device needs (nccl on CUDA,
gloo on the CPU).

CPU threads: on the CPU device the model step (torch's intra-op threads) and the DALI pipeline
(its own thread pool, prefetching the next batches meanwhile) share the process's cores. Together
they never ask for more threads than there are cores (`thread_split`): torch's OpenMP threads wait
for each other at every operator, so one of them descheduled stalls the rest (2 cores, one
resnet18 step at batch 30, 64 px, with the DALI loader running and other processes busy: about
1.5 s with 2 torch threads against 0.4-0.6 s with 1; on an idle machine 2 threads were 1.3-1.6x
faster, bench/RESULTS.md). The split is applied where `resolve_runtime` is given DALI's threads
(the benchmark does); the commands leave torch's default, which was faster on an idle 2-core
machine. OMP_NUM_THREADS, where set, wins.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import torch

from .errors import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str = "fp32"  # fp32 | fp16 | bf16: autocast's dtype (fp32: no autocast)
    compile: bool = False  # torch.compile the models
    compile_mode: str = "reduce-overhead"
    channels_last: bool = True
    rank: int = 0
    world: int = 1
    # The DALI pipeline's threads within this process's share of the cores (thread_split on the
    # CPU device; as asked on CUDA). None: not asked (the commands, a Runtime built by hand): the
    # loader keeps data.num_threads. `DaliLoader.from_config` / `from_split` given this Runtime
    # as `device` take it in place of data.num_threads where it is set.
    dali_threads: int | None = None

    @property
    def main(self) -> bool:
        """The process that evaluates and writes files (rank 0)."""
        return self.rank == 0

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype images enter the models in: fp16 under autocast on CUDA (the loader's own),
        fp32 otherwise (CPU convolutions take fp32 or bf16, and autocast casts fp32 to bf16)."""
        return torch.float16 if self.precision != "fp32" and self.device.type == "cuda" else torch.float32

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.compile and self.device.type == "cuda" and "reduce-overhead" in self.compile_mode

    def autocast(self):
        """The autocast context of this precision (a no-op for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, enabled only for fp16 (fp16's range needs it; bf16 and fp32 do not)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")


def resolve_device(name, what: str = "run.device") -> torch.device:
    """The one device parser: "auto" (cuda if available, else cpu), "cpu", "cuda" (the current
    CUDA device) or "cuda:N", or a torch.device. `what` names the setting in the one-line
    ConfigError (the loader says "the loader's device")."""
    name = str(name).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", name):
        raise ConfigError(f"{what} = {name!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"{what} = {name!r} but CUDA is not available here (no GPU visible "
                          f"or torch {torch.__version__} built without CUDA): use cpu or auto")
    index = int(name.split(":")[1]) if ":" in name else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"{what} = {name!r} but only {count} CUDA device(s) are visible: "
                          f"use cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def precision_for(device_type: str, capability=None, requested: str = "auto",
                  bf16_supported: bool | None = None) -> str:
    """The precision for a device, as a pure function (testable without a GPU).

    `capability` is the CUDA compute capability, (major, minor) or major alone; `bf16_supported`
    defaults to "capability major >= 8".
    """
    if requested not in ("auto",) + PRECISIONS:
        raise ConfigError(f"run.precision = {requested!r}: use auto, fp32, fp16 or bf16")
    if device_type != "cuda":
        if requested == "fp16":
            raise ConfigError(f"run.precision = fp16 is not supported on {device_type}: "
                              "use bf16 or fp32")
        return "fp32" if requested == "auto" else requested
    major = capability[0] if isinstance(capability, (tuple, list)) else capability
    major = 0 if major is None else int(major)
    if bf16_supported is None:
        bf16_supported = major >= 8
    if requested == "auto":
        # torch reports bf16 as supported on Turing through slow emulation: require Ampere too.
        return "bf16" if bf16_supported and major >= 8 else "fp16"
    if requested == "bf16" and not bf16_supported:
        raise ConfigError("run.precision = bf16 is not supported on this GPU: use fp16 or fp32")
    return requested


def choose_precision(device: torch.device, requested: str = "auto") -> str:
    """"fp32", "fp16" or "bf16" for `device`, reading the GPU's capability where it is CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return precision_for(device.type, None, requested)
    return precision_for("cuda", torch.cuda.get_device_capability(device), requested,
                         torch.cuda.is_bf16_supported())


def use_compile(setting: str, device: torch.device) -> bool:
    """run.compile: "on", "off", or "auto" (on where CUDA is: compiling on the CPU is slow)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def available_cores() -> int:
    """The cores this process may run on (its affinity mask; os.cpu_count() where unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def thread_split(cores: int, dali_threads: int) -> tuple[int, int]:
    """(torch threads, DALI threads) for a CPU run on `cores` cores that asks DALI for
    `dali_threads` (0: auto, half the cores): DALI gets what it asks for but leaves torch at least
    one core; torch gets the rest. The two add up to the cores (two, on one core)."""
    cores = max(1, int(cores))
    want = max(1, cores // 2) if dali_threads <= 0 else int(dali_threads)
    dali = max(1, min(want, cores - 1))
    return max(1, cores - dali), dali


def set_cpu_threads(device: torch.device, dali_threads: int | None,
                    local_world: int = 1) -> int | None:
    """Apply thread_split on the CPU device (this process's share of the cores when several
    processes share the machine) and return DALI's threads; on CUDA, DALI's threads as asked
    (0: half the cores, at most 8), torch's left alone (it runs few CPU operators there).
    None where `dali_threads` is None (nothing asked, nothing set). OMP_NUM_THREADS, where set,
    keeps torch's threads."""
    if dali_threads is None:  # not asked: torch keeps its own default (see the module's note)
        return None
    asked = int(dali_threads)
    if device.type != "cpu":
        return asked if asked > 0 else max(1, min(8, available_cores() // 2))
    torch_threads, dali = thread_split(available_cores() // max(1, local_world), asked)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(torch_threads)
    return dali


def resolve_runtime(run, dali_threads: int | None = None) -> Runtime:
    """The runtime of a `RunConfig`; under torchrun, also starts this process's group.
    `dali_threads` is `data.num_threads` (None: its default); on the CPU device torch's threads
    are set so that torch and DALI together ask for no more threads than cores, and
    `Runtime.dali_threads` is DALI's share (a loader built with `device=rt` takes it)."""
    world = launched_world()
    device = resolve_device(run.device)
    rank = 0
    if world > 1:
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        init_process_group(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return Runtime(device=device, precision=choose_precision(device, run.precision),
                   compile=use_compile(run.compile, device), compile_mode=run.compile_mode,
                   channels_last=run.channels_last, rank=rank, world=world,
                   dali_threads=set_cpu_threads(device, dali_threads, local_world))


# --------------------------------------------------------------------------------------------
# Several processes (torchrun): the group, and the few collective calls the engine makes.
# --------------------------------------------------------------------------------------------

def launched_world() -> int:
    """The number of processes torchrun started (WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed process group; (0, 1) without one."""
    import torch.distributed as torch_dist
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def init_process_group(device: torch.device) -> None:
    import torch.distributed as torch_dist
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def barrier(rt: Runtime) -> None:
    if rt.world > 1:
        import torch.distributed as torch_dist
        torch_dist.barrier()


def all_reduce_mean(rt: Runtime, t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over the processes (`t` itself with one process)."""
    if rt.world == 1:
        return t
    import torch.distributed as torch_dist
    t = t.clone()
    torch_dist.all_reduce(t)
    return t / rt.world


def close_process_group() -> None:
    """End this process's group (torchrun), if one was started."""
    import torch.distributed as torch_dist
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def compiled(module, rt: Runtime):
    """`module` as the hot loop calls it: under torch.compile where enabled (reduce-overhead
    captures CUDA graphs; static shapes come from drop_last)."""
    return torch.compile(module, mode=rt.compile_mode) if rt.compile else module
