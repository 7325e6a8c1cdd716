"""Triton kernels, each beside the plain-torch reference of the same function.

Nothing is imported here: importing `kernels` must not import Triton (CPU hosts may lack it, and
`TRITON_INTERPRET=1` has to be set before any kernel module is imported).
"""
