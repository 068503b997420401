"""``merge.task_arithmetic``: base + λ · Σ wᵢ (modelᵢ − base) (Ilharco et al., "Editing models with
task arithmetic", https://arxiv.org/abs/2212.04089)."""
from splice.passes.merge._gta import register_gta

register_gta("task_arithmetic", "https://arxiv.org/abs/2212.04089", "Task arithmetic: a weighted sum of task vectors")
