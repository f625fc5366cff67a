"""updetr-jax: UP-DETR / DETR in JAX and Flax.

Public API:
  build_model(model_config) -> flax.linen.Module
  import_torch_checkpoint(path_or_state_dict, model_config) -> variables
"""

from updetr_jax.models import build_model
from updetr_jax.torch_import import import_torch_checkpoint

__all__ = ['build_model', 'import_torch_checkpoint']
