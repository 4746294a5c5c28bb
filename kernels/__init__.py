"""Triton kernels of the CGC ops, imported as ``cgc.kernels`` (see :mod:`cgc.ops.triton`)."""
