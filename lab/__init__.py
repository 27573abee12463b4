"""A private-namespace lab: real servers, clients and captures for the demo, benchmarks and tests.

Everything here runs inside network namespaces it creates and deletes again; nothing touches
the root namespace's interfaces.
"""
