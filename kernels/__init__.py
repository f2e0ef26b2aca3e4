"""Triton kernels for the DMD hot path (see issue 4). Imports only torch and triton."""
