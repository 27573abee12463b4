# What pyproject.toml cannot say:
# - bpf/ (top level, beside agent/) ships inside the wheel as the package agent.bpf, so an
#   installed agent finds its BPF sources (bcc compiles them at start-up);
# - the native ring path (ring_decode.c + ring_pump.c) is compiled here, at install time, into
#   agent/sources/ring/_ring_native*.so: the running host needs no compiler and no cache directory.
#   It is a plain shared library loaded with ctypes (never imported), so it has no Python
#   entry point. It is optional: where it cannot be built the agent uses the Python decoder.
import hashlib
from pathlib import Path

from setuptools import Extension, find_packages, setup

HERE = Path(__file__).parent
RING = "agent/sources/ring"
SOURCES = [f"{RING}/ring_decode.c", f"{RING}/ring_pump.c"]
# Hashed into the library, and recomputed from the installed sources when it is loaded
# (agent/sources/ring/native.py: source_digest), so a build of other sources is never used.
HASHED = [*SOURCES, f"{RING}/ring_decode.h", "bpf/mirror_event.h"]


def source_digest() -> str:
    digest = hashlib.sha256()
    for name in HASHED:
        digest.update((HERE / name).read_bytes())
    return digest.hexdigest()[:16]


native = Extension(
    "agent.sources.ring._ring_native",
    sources=SOURCES,
    include_dirs=["bpf", RING],
    define_macros=[("MD_SOURCE_DIGEST", f'"{source_digest()}"')],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-pthread"],
    extra_link_args=["-pthread"],
    optional=True,
)

setup(packages=[*find_packages(include=["agent*"]), "agent.bpf"],
      package_dir={"agent.bpf": "bpf"},
      ext_modules=[native])
