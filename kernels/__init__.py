"""Triton kernels for ghostfast, one file per op (installed as `ghostfast.kernels`)."""
