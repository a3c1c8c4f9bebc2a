"""``sib-bench``: timings of the S-IB head and of training steps, against the machine's limits.

- ``cli``: the command (head mode, step mode, tables, JSON, RESULTS.md).
- ``measure``: timing with warm-up and rotating inputs, peak memory, floor bytes (SPEC section 7).
- ``machine``: what the run ran on (CPU/GPU, caches, copy bandwidth, versions, git commit).
- ``step``: full training steps (plain CE, S-IB exact and finite-difference).
- ``plot``: time vs batch and roofline position (matplotlib).
"""
