"""Build the CUDA extension (CUTLASS grouped GEMM) into kernels/_build/.

    CUDA_HOME=/usr/local/cuda MAX_JOBS=2 python -m kernels.build [--reduced] [--jobs N] [--clean]

The CUTLASS .cu files are compiled directly with nvcc, each only for its own architecture (sm_90a
or sm_80) and without torch headers (torch headers cost ~100 s per file on 2 cores); then
torch.utils.cpp_extension.load compiles the torch binding (csrc/bindings.cpp) and links it with
those objects. Objects are cached under a hash of their source, headers, flags and CUTLASS
version; ninja relinks when the object list changes. Any compile error exits non-zero.

--reduced builds bf16 kernels only (no fp16): half the CUTLASS objects, for CI.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from kernels._ext import MODULE_NAME, build_dir

CSRC = Path(__file__).resolve().parent / "csrc"
GENCODE = {
    "sm90": "-gencode=arch=compute_90a,code=sm_90a",  # plain sm_90 drops the wgmma/TMA bodies
    "sm80": "-gencode=arch=compute_80,code=sm_80",    # SASS runs on every 8.x GPU
}
DTYPES = {"bf16": 0, "fp16": 1}  # csrc/launchers.h enum class DType
CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"


@dataclass(frozen=True)
class Unit:
    name: str
    source: str
    flags: tuple[str, ...]


def plan(reduced: bool) -> list[Unit]:
    dtypes = ["bf16"] if reduced else ["bf16", "fp16"]
    units = [Unit("elementwise", "elementwise.cu", (GENCODE["sm90"], GENCODE["sm80"]))]
    for arch in ("sm90", "sm80"):
        for dtype in dtypes:
            units.append(Unit(f"{arch}_{dtype}", f"{arch}_grouped_gemm.cu",
                              (GENCODE[arch], f"-DUPCLIP_DTYPE={DTYPES[dtype]}")))
    return units


def find_cuda_home() -> Path:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return Path(candidate)
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(nvcc).resolve().parent.parent
    raise SystemExit("kernels.build: nvcc not found; set CUDA_HOME (e.g. /usr/local/cuda)")


def find_cutlass() -> tuple[list[Path], str]:
    """CUTLASS include dirs and a version tag: $CUTLASS_PATH (a checkout) or the PyPI wheel."""
    root = os.environ.get("CUTLASS_PATH")
    if root:
        return [Path(root) / "include", Path(root) / "tools" / "util" / "include"], root
    spec = importlib.util.find_spec("cutlass_library")  # locate only: its Python deps are unused
    source = Path(spec.origin).resolve().parent / "source" if spec and spec.origin else None
    if source is None or not (source / "include" / "cute" / "tensor.hpp").exists():
        raise SystemExit(f"kernels.build: CUTLASS headers not found; `pip install --no-deps "
                         f"{CUTLASS_PIN}` or set CUTLASS_PATH to a CUTLASS checkout")
    version = importlib.metadata.version("nvidia-cutlass")
    return [source / "include", source / "tools" / "util" / "include"], f"nvidia-cutlass {version}"


def nvcc_flags(includes: list[Path]) -> list[str]:
    return [
        "-std=c++20", "-O3", "-DNDEBUG",  # NDEBUG: without it ptxas serialises every wgmma
        "--expt-relaxed-constexpr", "-Xcompiler=-fPIC",
        "-diag-suppress=2908",  # CUTLASS sm100 headers: implicit capture of this (C++20)
        f"-I{CSRC}", *(f"-I{p}" for p in includes),
    ]


def object_path(unit: Unit, objects: Path, flags: list[str], version: str) -> Path:
    digest = hashlib.sha256()
    for part in [version, *flags, *unit.flags]:
        digest.update(part.encode() + b"\0")
    for path in sorted(CSRC.glob("*.cu*")) + sorted(CSRC.glob("*.h")):
        digest.update(path.read_bytes())
    return objects / f"{unit.name}-{digest.hexdigest()[:16]}.o"


def compile_unit(nvcc: Path, unit: Unit, flags: list[str], out: Path) -> tuple[float, str]:
    tmp = out.with_suffix(".o.tmp")
    cmd = [str(nvcc), *flags, *unit.flags, "-c", str(CSRC / unit.source), "-o", str(tmp)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        log = (proc.stdout + proc.stderr).strip().splitlines()
        raise RuntimeError(f"{unit.name}: nvcc exited {proc.returncode}\n$ {' '.join(cmd)}\n"
                           + "\n".join(log[-60:]))
    tmp.replace(out)
    return seconds, " ".join(cmd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reduced", action="store_true", help="bf16 kernels only (CI)")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "1")),
                        help="parallel nvcc processes (default $MAX_JOBS or 1; 3-6 GB each)")
    parser.add_argument("--clean", action="store_true", help="delete the build directory first")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    started = time.monotonic()
    out_dir = build_dir()
    if args.clean and out_dir.exists():
        shutil.rmtree(out_dir)
    objects = out_dir / "obj"
    objects.mkdir(parents=True, exist_ok=True)

    cuda_home = find_cuda_home()
    os.environ["CUDA_HOME"] = str(cuda_home)  # before torch.utils.cpp_extension is imported
    os.environ.setdefault("MAX_JOBS", str(max(1, args.jobs)))
    # cpp_extension derives nvcc arch flags even for a .cpp-only load and fails on a machine
    # without a GPU unless this is set; the .cu objects above carry their own -gencode.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # ninja for cpp_extension lives next to this interpreter (a venv's bin/ may not be on PATH)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    includes, cutlass_version = find_cutlass()
    flags = nvcc_flags(includes)
    nvcc = cuda_home / "bin" / "nvcc"
    units = plan(args.reduced)
    print(f"kernels.build: {len(units)} CUDA objects ({'reduced: bf16' if args.reduced else 'full'})"
          f", {args.jobs} job(s), {cutlass_version}, nvcc {nvcc}", flush=True)

    timings: dict[str, float] = {}
    todo = {}
    for unit in units:
        path = object_path(unit, objects, flags, cutlass_version)
        if path.exists():
            print(f"  {unit.name}: cached", flush=True)
            timings[unit.name] = 0.0
        else:
            todo[unit] = path
    pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
    futures = {pool.submit(compile_unit, nvcc, unit, flags, path): unit
               for unit, path in todo.items()}
    try:
        for future in as_completed(futures):
            unit = futures[future]
            seconds, cmd = future.result()
            timings[unit.name] = round(seconds, 1)
            print(f"  {unit.name}: {seconds:.0f} s", flush=True)
            if args.verbose:
                print(f"    $ {cmd}", flush=True)
    except RuntimeError as error:
        pool.shutdown(wait=True, cancel_futures=True)  # let running nvcc finish, start no more
        print(f"kernels.build: compile failed\n{error}", file=sys.stderr)
        return 1
    pool.shutdown()
    object_files = [object_path(u, objects, flags, cutlass_version) for u in units]
    keep = {p.name for p in object_files}
    for stale in objects.glob("*.o"):
        if stale.name not in keep:
            stale.unlink()

    link_start = time.monotonic()
    from torch.utils import cpp_extension

    lib_dirs = [d for d in (cuda_home / "lib64", cuda_home / "lib") if d.is_dir()]
    try:
        module = cpp_extension.load(
            name=MODULE_NAME,
            sources=[str(CSRC / "bindings.cpp")],
            extra_cflags=["-O2", "-std=c++20", "-DNDEBUG",
                          f"-DUPCLIP_WITH_FP16={0 if args.reduced else 1}", "-DUPCLIP_WITH_SM80=1"],
            extra_include_paths=[str(CSRC)],
            extra_ldflags=[*map(str, object_files), *(f"-L{d}" for d in lib_dirs), "-lcudart"],
            build_directory=str(out_dir),
            with_cuda=True,
            verbose=args.verbose,
        )
    except Exception as error:  # compile/link errors surface as RuntimeError/ImportError
        print(f"kernels.build: building the torch binding failed: {type(error).__name__}: "
              f"{error}", file=sys.stderr)
        return 1
    timings["bindings+link"] = round(time.monotonic() - link_start, 1)
    total = round(time.monotonic() - started, 1)

    import torch

    info = {
        "module": str(out_dir / f"{MODULE_NAME}.so"),
        "reduced": args.reduced,
        "archs": module.build_info()["archs"],
        "dtypes": module.build_info()["dtypes"],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cutlass": cutlass_version,
        "nvcc_flags": flags,
        "seconds": timings,
        "total_seconds": total,
    }
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"kernels.build: built {info['module']} (archs {info['archs']}, dtypes "
          f"{info['dtypes']}) in {total:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
