"""Triton kernels of the CGC ops (see :mod:`cgc.ops.triton`)."""
