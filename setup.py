"""Build of raid_fast and its extension raid_fast._C (pybind11 + ninja).

Decision, printed in full at build time:
- RAID_FAST_NO_EXT=1      no extension (pure Python; fast paths report why they are missing);
- RAID_FAST_NO_CUDA=1     C++ (CPU) extension only;
- RAID_FAST_FORCE_CUDA=1  CUDA extension, or fail when it cannot be built;
- otherwise CUDA when the installed torch is a CUDA build and nvcc is found (a GPU need not be
  present: CPU-only machines with a CUDA torch compile and link the CUDA code), else C++ only.
TORCH_CUDA_ARCH_LIST replaces the default targets (sm_90 plus compute_90 PTX); MAX_JOBS caps
parallel compile jobs.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _cuda_home_from_nvcc():
    """Toolkit root of the nvcc on PATH, following wrapper scripts (nvcc reports where it runs)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-v", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        for line in (out.stdout + out.stderr).splitlines():
            # "#$ _HERE_=<toolkit>/bin": the directory of the real nvcc binary
            if "_HERE_=" in line:
                return str(Path(line.split("_HERE_=", 1)[1].strip()).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        pass
    return str(Path(nvcc).resolve().parent.parent)


NO_EXT = _flag("RAID_FAST_NO_EXT")
NO_CUDA = _flag("RAID_FAST_NO_CUDA")
FORCE_CUDA = _flag("RAID_FAST_FORCE_CUDA")

# torch guesses CUDA_HOME from `which nvcc` (a wrapper in /usr/local/bin gives /usr/local, which
# has no libcudart), so point it at the real toolkit before torch.utils.cpp_extension is imported
if not NO_EXT and not NO_CUDA and not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    _home = _cuda_home_from_nvcc()
    if _home is not None:
        os.environ["CUDA_HOME"] = _home

ext_modules = []
cmdclass = {}
BUILD_CUDA = False
if not NO_EXT:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    TORCH_HAS_CUDA = torch.version.cuda is not None
    BUILD_CUDA = not NO_CUDA and (FORCE_CUDA or (TORCH_HAS_CUDA and CUDA_HOME is not None))
    if FORCE_CUDA and (NO_CUDA or not TORCH_HAS_CUDA or CUDA_HOME is None):
        sys.exit(
            f"RAID_FAST_FORCE_CUDA=1 but CUDA cannot be built: RAID_FAST_NO_CUDA={NO_CUDA}, "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
    sources = ["csrc/bindings.cpp", "csrc/kmeans/kmeans_cpu.cpp", "csrc/search/search_cpu.cpp"]
    # no -std flag: torch's BuildExtension adds the standard its headers need (C++17 or C++20)
    cxx_flags = ["-O3", "-fopenmp"]
    define_macros = []
    extra = {"cxx": cxx_flags}
    Extension = CppExtension
    if BUILD_CUDA:
        Extension = CUDAExtension
        sources.append("csrc/kmeans/kmeans_cuda.cu")
        define_macros.append(("WITH_CUDA", None))
        nvcc_flags = ["-O3", "-lineinfo"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc_flags += ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90"]
        extra["nvcc"] = nvcc_flags
    ext_modules.append(
        Extension(
            name="raid_fast._C",
            sources=sources,
            include_dirs=[str(ROOT / "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
    print(
        "raid_fast build: "
        f"RAID_FAST_NO_EXT={NO_EXT} RAID_FAST_NO_CUDA={NO_CUDA} RAID_FAST_FORCE_CUDA={FORCE_CUDA} "
        f"torch={torch.__version__} torch.version.cuda={torch.version.cuda} CUDA_HOME={CUDA_HOME} "
        f"BUILD_CUDA={BUILD_CUDA} TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')} "
        f"MAX_JOBS={os.environ.get('MAX_JOBS')}",
        flush=True,
    )
else:
    print("raid_fast build: RAID_FAST_NO_EXT=1, building no extension (pure Python)", flush=True)

setup(
    # every package under raid_fast/, plus the top-level kernels/ folder installed as raid_fast.kernels
    packages=[*find_packages(include=["raid_fast", "raid_fast.*"]), "raid_fast.kernels"],
    package_dir={"raid_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
