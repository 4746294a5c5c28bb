"""The native extension of cgc; everything else about the package is in pyproject.toml.

``pip install --no-build-isolation -e .`` builds it against the installed torch.

The extension ``cgc._C`` (csrc/) is always built for the CPU; its CUDA kernels are added when
``nvcc`` and a CUDA build of torch are present. ``CGC_CUDA=0`` / ``CGC_CUDA=1`` forces them
off / on. Without a visible GPU the CUDA code is compiled for ``TORCH_CUDA_ARCH_LIST`` or, if
unset, for sm_80 and sm_90 (A100, H100/H200).
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0"


def _want_cuda(torch, cuda_home) -> bool:
    flag = os.environ.get("CGC_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"CGC_CUDA must be 0 or 1, got {flag!r}")
    possible = torch.version.cuda is not None and cuda_home is not None
    if flag == "1" and not possible:
        raise SystemExit(
            "CGC_CUDA=1 but CUDA cannot be built here: torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={cuda_home} (set CUDA_HOME to the toolkit)"
        )
    return possible if flag == "" else flag == "1"


def _extensions():
    # torch looks for the toolkit through `which nvcc` before /usr/local/cuda; an nvcc linked
    # into /usr/local/bin would then make it look for libcudart in /usr/local/lib64
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp"]  # torch.utils.cpp_extension adds the -std its headers need
    kwargs = dict(extra_link_args=["-fopenmp"])
    if _want_cuda(torch, CUDA_HOME):
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        nvcc = ["-O3", "-lineinfo"]
        ext = CUDAExtension(
            "cgc._C", sources + rel("csrc/cuda/*.cu"), extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs
        )
    else:
        ext = CppExtension("cgc._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
