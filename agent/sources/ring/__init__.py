"""The ring transport from the kernel: perf buffers (:mod:`.perfbuf`) or a BPF ring buffer
(:mod:`.ringbuf`), drained by a C thread (:mod:`.pump`, ``ring_pump.c``) or a Python one
(:mod:`.drain`), records decoded into segments by C (:mod:`.native`, ``ring_decode.c``) or
Python (:mod:`.events`), merged in kernel-time order across CPUs (:mod:`.reorder`)."""
