"""The VLA model (PaLM-E multimodal sentences, RT-2 action tokens), its processor (observations <->
tensors, bins -> actions) and checkpoints holding both."""
from vla.model.checkpoint import CheckpointError, create, load_checkpoint, save_checkpoint
from vla.model.config import ModelConfig
from vla.model.model import VLAModel
from vla.model.processor import Processor

__all__ = ["CheckpointError", "ModelConfig", "Processor", "VLAModel", "create", "load_checkpoint", "save_checkpoint"]
