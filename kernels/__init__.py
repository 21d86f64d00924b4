"""Private fused Triton kernels of epgx (installed as ``epgx.kernels``).

One module per fused operation, each ending in its autograd Function; the pure-torch
twin of every kernel is :mod:`epgx.ops`. The fused EPG step/train kernels are not part
of this release yet: ``backend="triton"`` raises a clear error until they land.
"""
