"""Registers, spills and shared memory of every kernel variant, per GPU architecture, without a GPU.

For each autotuned kernel of ds_fp4 (ds_fp4.kernels._launch.GPU_CONFIGS), each config in its GPU
autotune list, each flag combination its launcher can pick (ds_fp4.kernels.aot.launcher_variants) and
each architecture (sm_80 Ampere, sm_90 Hopper, sm_100 datacenter Blackwell, sm_120 consumer
Blackwell), the kernel is compiled with the installed Triton and its bundled ptxas:

- smem_bytes: Triton's dynamic shared memory plus any static shared memory ptxas reports. A launch
  needing more than the device's opt-in limit per block (smem_limit; 99 KiB on sm_120) fails with
  OutOfResources.
- regs, spill_bytes (spill stores): from ``ptxas -v``. Spills are not errors, but they put registers
  in local memory, which makes a GEMM slow.

One row per (kernel, config, arch, triton): the worst case over the flag variants (max of each figure,
with the variant that needs the most shared memory and the one that spills most). Rows of other
Triton versions already in the JSON are kept, so running this under CI's Triton and under the lent GPU
machine's (``make test-triton36`` builds that venv) covers both.

``--table`` then rewrites ds_fp4/kernels/_resource_table.py from the JSON: the figures the launchers
use to prune, per device, the configs that would not fit or would spill (ds_fp4.kernels._launch).

    python bench/kernel_resources.py                          # all kernels, all 4 archs, then --table
    python bench/kernel_resources.py --arch 120 --kernel gemm_native --no-table --json /tmp/k.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: interpreter functions cannot be compiled
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_JSON = ROOT / "bench" / "results" / "kernel_resources.json"
TABLE = ROOT / "ds_fp4" / "kernels" / "_resource_table.py"
FIELDS = ("kernel", "config", "arch", "triton", "regs", "spill_bytes", "smem_bytes", "smem_limit")


def units(archs, kernels):
    """(kernel, config key, arch, variant flags, compile args, num_warps, num_stages) to compile."""
    from ds_fp4.kernels import aot
    from ds_fp4.kernels._launch import config_key

    GPU_CONFIGS = aot.autotuned_kernels()

    out = []
    for arch in archs:
        for name, fn, flags, make_args in aot.launcher_variants(arch):
            if kernels and name not in kernels:
                continue
            if name not in GPU_CONFIGS:
                raise SystemExit(f"launcher_variants names {name!r}, which is not an autotuned kernel: "
                                 f"{sorted(GPU_CONFIGS)}")
            for cfg in GPU_CONFIGS[name]:
                out.append((name, config_key(cfg), arch, flags, fn, make_args(dict(cfg.kwargs)),
                            cfg.num_warps, cfg.num_stages))
    return out


_UNITS: list = []  # set before the pool forks: workers take indices, as JIT functions do not pickle


def _measure(index: int):
    from ds_fp4.kernels import aot

    name, key, arch, flags, fn, args, warps, stages = _UNITS[index]
    try:
        kernel, report = aot.compile_kernel(fn, args, arch, num_warps=warps, num_stages=stages)
        return {"ok": True, **aot.resources(kernel, report, arch)}
    except Exception as exc:  # a variant that does not compile is a finding, reported in its row
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000], "smem_limit": aot.SMEM_PER_BLOCK[arch]}


def aggregate(measured, triton_version):
    """Per (kernel, config, arch): the worst figures over the flag variants, and the variants that spill."""
    from ds_fp4.kernels._launch import variant_key

    rows = {}
    for (name, key, arch, flags, *_), r in measured:
        row = rows.setdefault((name, key, arch), {
            "kernel": name, "config": key, "arch": arch, "triton": triton_version, "regs": 0, "spill_bytes": 0,
            "smem_bytes": 0, "smem_limit": r["smem_limit"], "stack_bytes": 0, "variants": 0, "errors": [],
            "max_smem_variant": None, "max_spill_variant": None, "spilling_variants": {}})
        row["variants"] += 1
        if not r["ok"]:
            row["errors"].append({"variant": flags, "error": r["error"]})
            continue
        row["regs"] = max(row["regs"], r["regs"])
        row["stack_bytes"] = max(row["stack_bytes"], r["stack_bytes"])
        if row["max_smem_variant"] is None or r["smem_bytes"] > row["smem_bytes"]:
            row["smem_bytes"], row["max_smem_variant"] = r["smem_bytes"], flags
        if r["spill_bytes"]:
            row["spilling_variants"][variant_key(flags)] = r["spill_bytes"]
        if r["spill_bytes"] > row["spill_bytes"]:
            row["spill_bytes"], row["max_spill_variant"] = r["spill_bytes"], flags
    for row in rows.values():
        row["fits"] = not row["errors"] and row["smem_bytes"] <= row["smem_limit"]
    return sorted(rows.values(), key=lambda r: (r["kernel"], r["arch"], r["config"]))


def table_source(rows, variants) -> str:
    """ds_fp4/kernels/_resource_table.py, from the rows of every Triton version measured:

    MEASURED[kernel][config][arch] = (shared memory bytes, {variant: spill bytes}): the most shared
    memory any variant needs and the variants that spill, the worst case over the Triton versions. A
    config that failed to compile counts as not fitting. VARIANTS[kernel][arch]: the variants measured."""
    from ds_fp4.kernels import aot

    measured: dict = {}
    for r in rows:
        smem = r["smem_bytes"] if not r["errors"] else 1 << 30
        per_arch = measured.setdefault(r["kernel"], {}).setdefault(r["config"], {})
        old_smem, old_spills = per_arch.get(r["arch"], (0, {}))
        spills = dict(old_spills)
        for key, n in r["spilling_variants"].items():
            spills[key] = max(spills.get(key, 0), n)
        per_arch[r["arch"]] = (max(old_smem, smem), spills)
    versions = sorted({r["triton"] for r in rows})
    lines = ['"""Generated by bench/kernel_resources.py from bench/results/kernel_resources.json (Triton',
             f"{', '.join(versions)}); do not edit. See ds_fp4.kernels._launch.fitting_configs.",
             "",
             "MEASURED[kernel][config][arch] = (shared memory bytes per block, {variant: register spill bytes}): the",
             "most any variant needs, and the variants that spill, the worst case over the Triton versions.",
             'VARIANTS[kernel][arch]: the variants measured (ds_fp4.kernels.aot.launcher_variants)."""',
             "", f"ARCHS = {tuple(aot.ARCHS)}", "VARIANTS = {"]
    for kernel in sorted(variants):
        lines.append(f"    {kernel!r}: {{")
        for arch in sorted(variants[kernel]):
            lines.append(f"        {arch}: (")
            lines += [f"            {v!r}," for v in sorted(variants[kernel][arch])]
            lines.append("        ),")
        lines.append("    },")
    lines += ["}", "MEASURED: dict = {"]
    for kernel in sorted(measured):
        lines.append(f"    {kernel!r}: {{")
        for key in sorted(measured[kernel]):
            lines.append(f"        {key!r}: {{")
            for a in sorted(measured[kernel][key]):
                smem, spills = measured[kernel][key][a]
                if not spills:
                    lines.append(f"            {a}: ({smem}, {{}}),")
                    continue
                lines.append(f"            {a}: ({smem}, {{")
                lines += [f"                {v!r}: {n}," for v, n in sorted(spills.items())]
                lines.append("            }),")
            lines.append("        },")
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines) + "\n"


def measured_variants() -> dict:
    """kernel -> arch -> the variant keys launcher_variants yields there."""
    from ds_fp4.kernels import aot
    from ds_fp4.kernels._launch import variant_key

    out: dict = {}
    for arch in aot.ARCHS:
        for name, _fn, flags, _make in aot.launcher_variants(arch):
            out.setdefault(name, {}).setdefault(arch, set()).add(variant_key(flags))
    return out


def main(argv=None) -> int:
    from ds_fp4.kernels import aot

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"rows go here (default {DEFAULT_JSON})")
    ap.add_argument("--arch", type=int, action="append", choices=aot.ARCHS, help="repeatable; default all")
    ap.add_argument("--kernel", action="append", help="repeatable; default every autotuned kernel")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-table", action="store_true", help=f"do not rewrite {TABLE.relative_to(ROOT)}")
    args = ap.parse_args(argv)

    import triton

    archs = tuple(args.arch or aot.ARCHS)
    todo = units(archs, set(args.kernel or ()))
    _UNITS[:] = todo
    print(f"kernel_resources: triton {triton.__version__}, {len(todo)} compiles for sm_{'/'.join(map(str, archs))} "
          f"on {args.jobs} processes", flush=True)
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as pool:
        results = list(pool.map(_measure, range(len(todo)), chunksize=4))
    rows = aggregate(zip(todo, results, strict=True), triton.__version__)
    elapsed = time.perf_counter() - t0

    replaced = {(r["kernel"], r["arch"], r["triton"]) for r in rows}
    old = json.loads(args.json.read_text())["rows"] if args.json.exists() else []
    kept = [r for r in old if (r["kernel"], r["arch"], r["triton"]) not in replaced]
    all_rows = sorted(kept + rows, key=lambda r: (r["kernel"], r["arch"], r["config"], r["triton"]))
    doc = {"what": "per (kernel, config, arch, triton): worst case over the launcher's flag variants",
           "fields": list(FIELDS), "tools": "triton's bundled ptxas -v; smem = triton metadata.shared + static",
           "date": time.strftime("%Y-%m-%d"), "rows": all_rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")

    bad = [r for r in rows if not r["fits"] or r["spill_bytes"]]
    print(f"{len(rows)} rows in {elapsed:.0f} s -> {args.json}")
    print(f"{'kernel':16} {'arch':>4} {'regs':>4} {'spill':>6} {'smem':>7} {'limit':>7}  config")
    for r in bad:
        err = f"  ERROR {r['errors'][0]['error'][:80]}" if r["errors"] else ""
        print(f"{r['kernel']:16} {r['arch']:>4} {r['regs']:>4} {r['spill_bytes']:>6} {r['smem_bytes']:>7} "
              f"{r['smem_limit']:>7}  {r['config']}{err}")
    print(f"{len(bad)} of {len(rows)} (kernel, config, arch) do not fit or spill; the launchers prune them per device")
    if not args.no_table:
        TABLE.write_text(table_source(all_rows, measured_variants()))
        print(f"wrote {TABLE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
