"""The VLA stack's library, in layers that import only downwards: contracts (numpy only), then the
simulator (the top-level `sim` package), model, data and runtime, then `policies`, then the jobs
(apps) and the `vla` command (cli). No ROS here: the nodes live in ros2_ws/src/vla_ros."""
__version__ = "0.1.0"
