"""Adapter passes: LoRA (and its inits), fold/unfold; the framework is in ``_common.py``."""
from splice.passes.adapters import fold, lora  # noqa: F401
from splice.passes.adapters import lora_peft  # noqa: F401  (PEFT formats)
from splice.passes.adapters import dora, ia3, ssf  # noqa: F401  (read the base output/weight)
from splice.passes.adapters import dsee, extract, hft, lift, s2ft, sara  # noqa: F401  (masks, extraction)
from splice.passes.adapters import adalora, bone, vera  # noqa: F401  (PEFT's VeRA, MiSS/Bone, AdaLoRA)
from splice.passes.adapters import flora, nola, sorsa, svfit, tera  # noqa: F401  (methods PEFT lacks)
from splice.passes.adapters import peft  # noqa: F401  (adapter.peft: load a PEFT directory, after every format)
