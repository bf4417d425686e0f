"""ghostfast: fused kernels for GhostNet's Ghost module and GhostNetV2's DFC attention.

    import ghostfast
    fast = ghostfast.convert(model)        # swaps every Ghost module for a fused drop-in
    print(fast.ghostfast_report)

`ghostfast.ops` holds the ops, `ghostfast.nn` the modules, `ghostfast.reference` the eager math they match.
"""
from . import ops, reference
from . import nn
from .backends import GhostfastFallbackWarning, GhostfastUnsupported, available_backends
from .convert import ConversionReport, convert

__version__ = "0.1.0"

__all__ = ["convert", "ConversionReport", "available_backends", "ops", "nn", "reference",
           "GhostfastFallbackWarning", "GhostfastUnsupported", "__version__"]
