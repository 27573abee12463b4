"""The eBPF engine (``--engine tc|xdp``): the program in ``bpf/`` built and loaded
(:mod:`.program`, :mod:`.loader`), attached beside other programs (:mod:`.attach`,
:mod:`.links`, :mod:`.follow`), the kernel's permissions checked first (:mod:`.privileges`),
the few raw ``bpf(2)`` calls (:mod:`.bpfsys`), the record layout (:mod:`.layout`), tunnels
(:mod:`.decap`), and the packet source that wires them to a ring (:mod:`.source`)."""
