"""The implementations of the S-IB head and how one is chosen.

``reference`` is the plain-PyTorch ground truth; ``extension`` is the glue of the compiled
``sib_fast._C`` (cpu and cuda backends); ``triton`` holds the Triton kernels by stage;
``dispatch`` picks one for a call.
"""
