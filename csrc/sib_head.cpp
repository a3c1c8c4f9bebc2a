// The fused S-IB head ops, declared once for every device (schemas in sib_head_schema.h).
#include "sib_head_schema.h"

TORCH_LIBRARY(sib_fast, m) { sib_fast::define_head_ops(m); }
