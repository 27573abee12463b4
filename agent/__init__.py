"""mirror-agent: passive TCP traffic mirror."""
