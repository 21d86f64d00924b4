"""Test-session set-up shared by every lane.

Small tensors run faster on one thread than on several competing ones, and timings
stay stable; CI exports OMP_NUM_THREADS=1 as well. ``TRITON_INTERPRET`` (the Triton
interpreter lane) must be set in the environment before pytest starts, so that it is in
place before any kernel module is imported.
"""

import torch

torch.set_num_threads(1)
