"""What is learned: encoders, heads, losses, SimCLR / MoCo v2 / BYOL / SimSiam / Barlow Twins / VICReg /
DINO / SwAV / MAE, schedules, evaluation.

Pure PyTorch: nothing here imports Ray or MLflow.
"""

from methods.batchnorm import prepare_for_distributed, restore_batchnorm
from methods.barlow_twins import BarlowTwins
from methods.byol import BYOL
from methods.dino import DINO
from methods.encoders import ENCODERS, build_encoder
from methods.mae import MAE
from methods.moco import MoCo
from methods.simclr import SimCLR
from methods.simsiam import SimSiam
from methods.swav import SwAV
from methods.vicreg import VICReg

# Each class also names its augmentation preset (`augment_preset`, a `pipelines.augment.PRESETS` key).
METHODS = {"simclr": SimCLR, "moco": MoCo, "byol": BYOL, "simsiam": SimSiam,
           "barlow_twins": BarlowTwins, "vicreg": VICReg, "dino": DINO, "swav": SwAV, "mae": MAE}

__all__ = ["BYOL", "DINO", "ENCODERS", "MAE", "METHODS", "BarlowTwins", "MoCo", "SimCLR", "SimSiam", "SwAV", "VICReg",
           "build_encoder", "prepare_for_distributed", "restore_batchnorm"]
