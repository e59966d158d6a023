"""parallelspec: ParallelSpec speculative decoding on top of ps_kernels."""
__version__ = "0.1.0"
