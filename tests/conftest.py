import os

import pytest
import torch


def _triton_language_for_the_interpreter() -> None:
    """Without a GPU the Triton tests run the kernels in Triton's interpreter, which works only if
    ``triton.language`` was first imported with ``TRITON_INTERPRET=1`` (its library functions, such
    as ``tl.zeros``, are then interpretable). Any test module may import it first without the variable
    (torchvision does, at import), so it is imported here, before collection, with the variable set
    for the import only. The compile test runs Triton in a subprocess of its own."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:  # no Triton: its tests skip
        pass
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = previous


if not torch.cuda.is_available():
    _triton_language_for_the_interpreter()


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
