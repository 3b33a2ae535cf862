"""The VLA model (PaLM-E multimodal sentences, RT-2 action tokens), its tokenizers and checkpoints."""
from vla.model.action_tokenizer import ActionTokenizer
from vla.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vla.model.config import ModelConfig
from vla.model.model import VLAModel

__all__ = ["ActionTokenizer", "CheckpointError", "ModelConfig", "VLAModel", "load_checkpoint", "save_checkpoint"]
