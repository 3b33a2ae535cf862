"""ROS 2 nodes of the VLA stack. Only this package imports rclpy."""
