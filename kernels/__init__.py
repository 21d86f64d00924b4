"""Private fused Triton kernels of epgx (installed as ``epgx.kernels``).

One module per fused operation; the pure-torch twin of every kernel is :mod:`epgx.ops`.

- :mod:`epgx.kernels.epg_train`: a whole FSE/GRE echo train in one launch, the state
  held on chip, and its exact first-order derivatives (a tangent kernel, custom ops and
  an autograd Function; ``epgx.fse``/``epgx.gre`` with ``backend="triton"``).
- :mod:`epgx.kernels.epg_step`: one EPG-X timestep (pulse → relaxation/exchange → shift
  → recovery) on a state in global memory, with its adjoint and tangent kernels, for runs
  that keep every state (custom ops ``epgx::epg_step``/``_bwd``/``_jvp``).
- :mod:`epgx.kernels.epg_train_adjoint`: the reverse mode of ``epg_train`` (the adjoint
  EPG-X recursion from ⌈√T⌉ checkpoints): every gradient of a train in one launch.
- :mod:`epgx.kernels.epg_program`: any block sequence (:mod:`epgx.blocks`) in one launch,
  its event table interpreted at run time with the state on chip, and its exact
  first-order derivatives (a tangent kernel, custom ops ``epgx::epg_program``/
  ``_tangent``/``_vjp``; ``epgx.blocks.simulate`` and the models with ``backend="triton"``).
- :mod:`epgx.kernels.molli`: the MOLLI T1 fit (T1* grid × sign patterns, then
  Levenberg–Marquardt) of every voxel in one launch (``epgx.fit.molli`` with
  ``backend="triton"``).

Importing a kernel module needs ``triton``; set ``TRITON_INTERPRET=1`` before the first
import to run the kernels in Triton's CPU interpreter.
"""
