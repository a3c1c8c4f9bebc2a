"""``sib-bench``: timings of the S-IB head and of training steps, against the machine's limits.

- ``cli``: the command: parses the arguments, checks the outputs, runs a mode, prints and saves.
- ``head``: head mode (each lane's forward, backward, forward+backward, memory, error; its table).
- ``step``: step mode (full training steps: plain CE, S-IB exact and finite-difference; its table).
- ``lanes``: the device, the lanes as functions, the upstream gradients, the error against the reference.
- ``record``: the JSON record (made, saved, loaded) and the text its tables and plot share.
- ``report``: the printed report of a record and its RESULTS.md section.
- ``plot``: time vs batch and roofline position (matplotlib).
- ``measure``: timing with warm-up and rotating inputs, peak memory, floor bytes (docs/loss.md section 7).
- ``machine``: what the run ran on (CPU/GPU, caches, copy bandwidth, versions, git commit).
- ``profile``: the largest kernels of one forward+backward (``--profile``).
- ``tune``: ``python -m sib_fast.bench.tune``, the Triton backend's plan constants timed side by side.
"""
