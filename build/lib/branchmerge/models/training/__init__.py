"""Training: one shared toolkit (toolkit.py), then SFT (sft.py, recipes.py) and the GRPO family (grpo.py); each
method's settings in config.py."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss or weights: nothing of it may be saved. `step` is the optimizer step
    (1-based) where it was seen; the stage adds which setting to look at."""

    def __init__(self, what: str, step: int | None):
        self.what, self.step = what, step
        super().__init__(what + (f" at optimizer step {step}" if step is not None else ""))
