"""Learning-rate and momentum schedules as small functions (pattern: lightly `utils/scheduler.py`)."""

from __future__ import annotations

import math


def cosine_schedule(step: float, max_steps: float, start_value: float, end_value: float) -> float:
    """Half-cosine from `start_value` at step 0 to `end_value` at `max_steps` (clamped after).

    BYOL's target decay is `cosine_schedule(k, K, 0.996, 1.0)`:
    tau = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2 (Grill et al. 2020, sec. 3.2).
    """
    if max_steps <= 0:
        return end_value
    progress = min(max(step / max_steps, 0.0), 1.0)
    return end_value - (end_value - start_value) * (math.cos(math.pi * progress) + 1) / 2


def warmup_cosine(step: float, max_steps: float, warmup_steps: float, base_value: float,
                  final_value: float = 0.0) -> float:
    """Linear warm-up to `base_value` over `warmup_steps`, then cosine decay to `final_value`.

    SimCLR/BYOL's learning-rate schedule (10 warm-up epochs, then cosine without restarts). Step
    0 of the warm-up gives base_value / warmup_steps, not 0, so the first step still moves.
    """
    if step < warmup_steps:
        return base_value * (step + 1) / warmup_steps
    return cosine_schedule(step - warmup_steps, max_steps - warmup_steps, base_value, final_value)
