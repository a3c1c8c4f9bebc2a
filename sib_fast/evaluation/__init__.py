"""Evaluation of trained models (``sib-eval``): explanations (``explain``), their localization
metrics (``localization``), the checkpoints and images explained (``inputs``) and the report
(``report``)."""

PROG = "sib-eval"  # the command whose lines the evaluation modules write
