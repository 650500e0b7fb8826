"""Triton kernels of ffengine and their launchers (installed as ``ffengine.kernels``).

One module per op, each pairing a private ``@triton.jit`` kernel with a public launcher that
validates its inputs: ``ffengine.kernels.ghost_score.ghost_score_triton``. Importing this
package does not import Triton; importing an op's module does. Users normally go through
``ffengine.ops`` (``backend="triton"``), which checks that Triton can run before trusting it.

Triton decides at kernel definition (module import) whether a kernel is compiled for the GPU
or run by its CPU interpreter: set ``TRITON_INTERPRET=1`` *before* importing an op's module
to run it on CPU tensors (slow; a test mode).
"""
