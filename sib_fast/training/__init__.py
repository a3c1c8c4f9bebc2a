"""Training with the S-IB loss: the step (exact or finite-difference VJP), and ``sib-train``'s run
(``loop``: the epochs; ``prepare``: what a run builds first and what ``--resume`` restores), its
processes, faults, held-out pass, history, checkpoints, data and models."""

PROG = "sib-train"  # the command whose lines the training modules write
