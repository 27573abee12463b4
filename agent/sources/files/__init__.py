"""Capture files as a packet source: :mod:`.capstream` reads a file (or pipe) front to back
without mapping it, :mod:`.capfile` splits pcap and pcapng into frames, :mod:`.pcapfile` is
the packet source that decodes them into segments."""
