"""What is learned: encoders, heads, losses, SimCLR / MoCo v2 / BYOL, schedules, evaluation.

Pure PyTorch: nothing here imports Ray or MLflow.
"""

from methods.batchnorm import prepare_for_distributed, restore_batchnorm
from methods.byol import BYOL
from methods.encoders import ENCODERS, build_encoder
from methods.moco import MoCo
from methods.simclr import SimCLR

METHODS = {"simclr": SimCLR, "moco": MoCo, "byol": BYOL}

__all__ = ["BYOL", "ENCODERS", "METHODS", "MoCo", "SimCLR", "build_encoder",
           "prepare_for_distributed", "restore_batchnorm"]
