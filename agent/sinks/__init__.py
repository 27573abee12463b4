"""Sinks: where mirrored bytes go (shadow target, recordings, pcap files)."""
