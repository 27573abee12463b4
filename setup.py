# The one thing pyproject.toml cannot say: bpf/ (top level, beside agent/) ships inside the
# wheel as the package agent.bpf, so an installed agent finds its BPF sources.
from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["agent*"]), "agent.bpf"], package_dir={"agent.bpf": "bpf"})
