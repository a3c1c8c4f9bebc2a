"""The ``triton`` backend: the S-IB head as fused Triton kernels, one module per stage.

``plan`` (block sizes and tunables), ``buffers`` (the small shared buffers and rank table),
``pixels`` (pixel addressing and splits), the kernels by stage: ``select`` (channel mean, rank select),
``box`` (box mean), ``gram`` (mask, masked Grams, the scalar head), ``backward``; then
``launch`` (the launch sequences) and ``ops`` (the custom ops, the backend's interface).
docs/triton.md describes the stages and says where to start reading.

Nothing is imported here: the kernels are decorated when their modules are imported, and
``TRITON_INTERPRET=1`` must be set by then for them to run in Triton's interpreter.
"""
