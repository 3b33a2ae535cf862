"""Episodes as rosbag2 (MCAP) directories and datasets of them: ROS 2 messages without ROS
(messages), writing a bag (writer) and a sim episode into one (record), reading one back (reader),
datasets and their crash-safe manifest (dataset), and the training index over a dataset (index).
Format: datasets/README.md."""
