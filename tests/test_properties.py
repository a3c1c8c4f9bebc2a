"""Property-based test of the cpu backend on odd inputs (tests/odd_inputs.py): the SPEC section 8
rule on every drawn case, values and gradients against the float64 reference where the case is
well-conditioned. The Triton backend (interpreter) and the CUDA emulation run the same check in
their own test files, with fewer cases."""
import pytest
from hypothesis import given

import sib_fast
from odd_inputs import cases, check_backend, property_settings

pytestmark = pytest.mark.skipif("cpu" not in sib_fast.available_backends("cpu"),
                                reason="the compiled extension is not built")


@property_settings(examples_ci=150, examples_wide=20000)
@given(cases(max_side=24))
def test_cpu_backend_on_odd_inputs(case):
    check_backend("cpu", case)
