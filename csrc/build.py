"""cffi build of pgwfwd's data plane (API mode), linked with libxdp and libbpf.

The declarations come from csrc/pgwfwd.h, the one place that states the C
API, so the binding cannot drift from the header.
"""

from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent
SOURCES = ["process.c", "queue.c", "xdp.c"]


def cdef_text(header: str) -> str:
    """The header without the preprocessor lines cdef does not take."""
    kept = []
    for line in header.splitlines():
        if line.startswith(("#ifndef", "#endif", "#include")):
            continue
        if line.startswith("#define PGWFWD_H"):
            continue
        kept.append(line)
    return "\n".join(kept)


ffibuilder = FFI()
ffibuilder.cdef(cdef_text((CSRC / "pgwfwd.h").read_text()))
ffibuilder.set_source(
    "pgwfwd._native",
    '#include <stdint.h>\n#include "pgwfwd.h"\n',
    # Relative paths, as setuptools wants them: builds run from the root.
    sources=[f"csrc/{name}" for name in SOURCES],
    include_dirs=[str(CSRC)],
    libraries=["xdp", "bpf"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
