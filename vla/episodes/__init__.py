"""Episodes as rosbag2 (MCAP): topics and message fields (topics), writing without ROS (messages,
writer, record), reading (reader), datasets and their crash-safe manifest (dataset), the training
index (index) and the `vla collect | dataset | replay` commands (collect, inspect, replay).
Format: datasets/README.md."""
