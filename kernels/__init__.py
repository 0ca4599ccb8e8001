"""Fused Triton kernels, installed as `pyengine.kernels` (never a top-level `kernels` module: that
name belongs to the Hugging Face `kernels` package, which transformers imports).

Nothing is imported or compiled here at import time; the kernels land with the Triton issue.
"""
