"""What every launcher shares: interpreter detection, input checks, launch options, device facts."""

from __future__ import annotations

import functools
import os

import torch
import triton


def _interpret_mode() -> bool:
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if runtime is not None and hasattr(runtime, "interpret"):
        return bool(runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # triton without knobs


# Triton decides at decoration time whether a @triton.jit function is compiled or interpreted, so
# this reflects the mode the kernels of this package were created in (TRITON_INTERPRET=1 at import).
INTERPRET: bool = _interpret_mode()

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def launch_options() -> dict:
    """Compile options for every kernel here: no FMA contraction (bit-exactness against torch)."""
    return {"enable_fp_fusion": False}


def check_2d_input(name: str, x: torch.Tensor) -> None:
    """ValueError naming the offending value unless x is a 2D fp32/bf16/fp16 tensor with K % 16 == 0."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} expects a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} expects a 2D tensor; got shape {tuple(x.shape)}")
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"{name} expects float32, bfloat16 or float16; got dtype {x.dtype}")
    if x.shape[1] % 16:
        raise ValueError(f"{name} needs the last dim divisible by 16; got shape {tuple(x.shape)}")


@functools.cache
def capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def is_native_fp4(device: torch.device) -> bool:
    """True where tl.dot_scaled runs e2m1 x e2m1 with E4M3 scales on FP4 tensor cores (sm_100+)."""
    if INTERPRET or device.type != "cuda":
        return False
    return capability(device.index if device.index is not None else torch.cuda.current_device())[0] >= 10


def has_fp8_convert(device: torch.device) -> bool:
    """True where Triton can convert float8e4nv (sm_89+, and the interpreter)."""
    if INTERPRET or device.type != "cuda":
        return True
    return capability(device.index if device.index is not None else torch.cuda.current_device()) >= (8, 9)


# --- autotune lists, pruned per device --------------------------------------------------------------
# Every autotuned kernel of this package, by name, with the configs it autotunes over on a GPU (whatever
# mode this process runs in): bench/kernel_resources.py compiles each of them for every architecture.
GPU_CONFIGS: dict[str, list] = {}

_warned: set = set()


def config_key(cfg) -> str:
    """A config as a stable string: its meta-parameters sorted, then warps and stages."""
    meta = ",".join(f"{k}={v}" for k, v in sorted(cfg.kwargs.items()))
    return f"{meta},num_warps={cfg.num_warps},num_stages={cfg.num_stages}"


def measured_arch(cc: int) -> int:
    """The measured architecture whose compiled code a device of compute capability ``cc`` (86, 90, 120...)
    runs: the nearest one at or below it (sm_86 and sm_89 take sm_80's, sm_103 sm_100's, sm_121 sm_120's)."""
    from ._resource_table import ARCHS

    below = [a for a in ARCHS if a <= cc]
    if not below:
        raise ValueError(f"compute capability {cc // 10}.{cc % 10} is below sm_{min(ARCHS)}, the oldest "
                         "architecture these kernels support")
    return max(below)


def variant_key(flags: dict) -> str:
    """A kernel variant (the flags its launcher set) as a stable string: 'HADAMARD=1,STOCHASTIC=0,...'."""
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(flags.items()))


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def launch_flags(name: str, args: dict) -> dict | None:
    """The variant of kernel ``name`` a launch picks, from its arguments (by name): the flags that
    aot.launcher_variants measures. fp16 input is looked up as bf16 (the same 16-bit load and convert)."""
    try:
        if name in ("gemm_emulated", "gemm_native"):
            return {"FP8_CVT": bool(args["FP8_CVT"])}
        if name in ("decode", "gemm_epilogue"):
            out = {"out": _dtype_name(args["out_ptr"])}
            return {**out, "GLOBAL": bool(args["GLOBAL"])} if name == "decode" else out
        dtype = "bfloat16" if args["x_ptr"].dtype == torch.float16 else _dtype_name(args["x_ptr"])
        flags = {"dtype": dtype, "HADAMARD": bool(args["HADAMARD"])}
        if name == "amax":
            return {**flags, "strided": not args["ROW_CONTIG"]}
        flags.update(STOCHASTIC=bool(args["STOCHASTIC"]), SCALE_UP=bool(args["SCALE_UP"]))
        if name == "quantize_1x16":
            return {**flags, "strided": not args["ROW_CONTIG"]}
        if name == "quantize_16x16":
            return {**flags, "WRITE_T": bool(args["WRITE_T"])}
    except (KeyError, AttributeError):
        return None
    return None


def fitting_configs(name: str, configs: list, cc: int, smem_limit: int, flags: dict | None = None) -> list:
    """The configs of kernel ``name`` that fit a device of compute capability ``cc`` with ``smem_limit``
    bytes of shared memory per block: measured (bench/kernel_resources.py, in ds_fp4/kernels/
    _resource_table.py) on the nearest measured architecture to need at most that much in every variant,
    and to spill no register in the variant ``flags`` (in any variant when ``flags`` is None or was
    never measured on that architecture, as FP8_CVT=1 on sm_86/89, which take sm_80's figures).
    Configs never measured are kept (Triton's autotuner skips one that fails to launch). When every
    config that fits spills, those are kept with a warning. Raises RuntimeError when no config fits,
    rather than letting the launch fail."""
    from ._resource_table import MEASURED, VARIANTS

    table = MEASURED.get(name, {})
    arch = measured_arch(cc)
    key = variant_key(flags) if flags is not None else None
    known = key in VARIANTS.get(name, {}).get(arch, ())  # else: the worst case over the variants
    fit, spilling = [], []
    for cfg in configs:
        row = table.get(config_key(cfg), {}).get(arch)
        if row is None:
            fit.append(cfg)
            continue
        smem, spills = row
        if smem > smem_limit:
            continue
        spill = spills.get(key, 0) if known else max(spills.values(), default=0)
        (spilling if spill else fit).append(cfg)
    if fit:
        return fit
    if spilling:
        if (name, cc, key) not in _warned:
            _warned.add((name, cc, key))
            import warnings
            warnings.warn(f"ds_fp4: every config of the {name} kernel spills registers on sm_{cc}"
                          f"{f' ({key})' if key else ''}; autotuning over those that fit shared memory",
                          RuntimeWarning, stacklevel=2)
        return spilling
    raise RuntimeError(
        f"ds_fp4: no config of the {name} kernel fits sm_{cc} ({smem_limit} bytes of shared memory per block); "
        f"measured needs: {[table.get(config_key(c), {}).get(arch, (None,))[0] for c in configs]}. "
        "Use backend='torch' and report this device")


def _max_shared_mem(index: int) -> int:
    """What Triton checks a launch against: the device's opt-in shared memory per block."""
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # pragma: no cover - drivers without this query
        props = torch.cuda.get_device_properties(index)
        return int(getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block))


def _prune(name: str, configs: list, named_args: dict, **kwargs) -> list:
    device = next((v.device for v in named_args.values() if isinstance(v, torch.Tensor)), None)
    if INTERPRET or device is None or device.type != "cuda":
        return configs
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = capability(index)
    flags = launch_flags(name, {**named_args, **kwargs})
    return fitting_configs(name, configs, major * 10 + minor, _max_shared_mem(index), flags)


def autotune(name: str, configs_fn, key: list):
    """triton.autotune over ``configs_fn(INTERPRET)``, pruned to what fits the device at hand."""
    GPU_CONFIGS[name] = configs_fn(False)
    return triton.autotune(configs=configs_fn(INTERPRET), key=key,
                           prune_configs_by={"early_config_prune": functools.partial(_prune, name)})
