"""Build steps that pyproject.toml cannot state: the cffi extension and the
XDP object, compiled with clang into the package so an installed pgwfwd
carries its own BPF program."""

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BPF_SOURCE = ROOT / "bpf" / "pgwfwd.bpf.c"
BPF_OBJECT = ROOT / "pgwfwd" / "pgwfwd.bpf.o"


def build_bpf_object() -> None:
    """clang -target bpf; the asm headers live under the multiarch path."""
    machine = subprocess.run(
        ["gcc", "-dumpmachine"], check=True, capture_output=True, text=True
    ).stdout.strip()
    subprocess.run(
        ["clang", "-O2", "-g", "-Wall", "-Werror", "-target", "bpf",
         f"-I/usr/include/{machine}", "-c", str(BPF_SOURCE), "-o", str(BPF_OBJECT)],
        check=True,
    )


class BuildWithBpf(build_py):
    def run(self) -> None:
        build_bpf_object()
        super().run()


setup(
    cffi_modules=["csrc/build.py:ffibuilder"],
    cmdclass={"build_py": BuildWithBpf},
)
