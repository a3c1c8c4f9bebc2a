"""What the command tests share: a tiny sib-train run and a fixture restoring torch's thread count."""
import warnings

import pytest
import torch

TINY = ["--image-size", "16", "--train-samples", "16", "--val-samples", "8", "--batch-size", "8",
        "--threads", "1", "--num-classes", "3"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
    torch.set_num_threads(threads)
