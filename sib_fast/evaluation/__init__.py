"""Evaluation: explanations of a trained model and their localization metrics."""
