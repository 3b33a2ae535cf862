"""VLA core: model, action tokens, training, checkpoints, runtimes and episode I/O (no ROS here)."""
__version__ = "0.1.0"
