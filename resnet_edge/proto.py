"""Deprecated alias: the gRPC messages moved to ``resnet_edge.serving.proto`` when the package was split
into its rooms (issue 22). A client program that builds Open Inference Protocol messages with
``from resnet_edge.proto import SERVICE, messages`` keeps working through this alias, with a
DeprecationWarning; import ``resnet_edge.serving.proto`` instead. It is the only alias: the other modules
that moved were the CLI's own insides, which no client imports. To be removed in 0.3.
"""

from __future__ import annotations

import sys
import warnings

from resnet_edge.serving import proto as _moved

warnings.warn(
    "resnet_edge.proto moved to resnet_edge.serving.proto; import it from there (this alias goes in 0.3)",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved  # the same module object: one descriptor pool, one set of classes
