"""The native CPU kernels, built from source by pip with the machine's compiler: the model's (one
C++ extension) and the samplers' row reductions (one C file).

Both are optional: where they cannot be built (no compiler, not x86-64) verispec installs without
them and runs on the torch backend and numpy. Nothing here needs torch, so an isolated build never
pulls it in.
"""

import platform
from pathlib import Path

from setuptools import Extension, setup

CSRC = Path("verispec/model/native/csrc")
extensions = []
if platform.machine().lower() in ("x86_64", "amd64"):
    extensions.append(Extension(
        "verispec.model.native._native",
        sources=[str(CSRC / "api.cpp")],
        depends=[str(p) for p in sorted(CSRC.glob("*.h"))],
        # no -ffast-math: the kernels' exactness and row invariance rest on IEEE operations in a fixed order
        extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-mavx2", "-mfma", "-mf16c", "-fno-math-errno", "-pthread"],
        extra_link_args=["-pthread"],
        language="c++",
        optional=True,
    ))

    extensions.append(Extension(  # the samplers' row reductions (verispec/sampling/reduce.py)
        "verispec.sampling._rows",
        sources=["verispec/sampling/csrc/rows.c"],
        depends=[str(CSRC / "exp8.h")],
        extra_compile_args=["-O3", "-fvisibility=default", "-mavx2", "-mfma", "-fno-math-errno"],
        optional=True,
    ))

setup(ext_modules=extensions)
