"""Suite-wide settings: one torch thread (the models here are tiny; threads only add overhead)."""

import torch

torch.set_num_threads(1)
