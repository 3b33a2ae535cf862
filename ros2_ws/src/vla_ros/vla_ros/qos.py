"""QoS profiles, chosen per kind of stream and shared by every node so that they always match."""
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

# Cameras and joint states: only the newest message matters and a late one is useless, so best
# effort with a short queue (what camera drivers publish; a best-effort reader also matches a
# reliable writer).
SENSOR = QoSProfile(depth=5, reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE,
                    history=HistoryPolicy.KEEP_LAST)
# The IMU arrives in bursts (the sim publishes a control step's 12 samples at once): the queue must
# hold several bursts while the policy node is busy in inference, or window samples are lost. The
# recorder uses it for its other sensor streams, as it may pause while a bag chunk is compressed.
SENSOR_QUEUED = QoSProfile(depth=64, reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE,
                           history=HistoryPolicy.KEEP_LAST)
# The recorder's IMU queue: a lockstep sim runs faster than real time (12 samples per step, a step
# per inference), so 64 samples last a fraction of a second; a recorder falling behind for a moment
# (a bag chunk compressed, CPU shared with the sim) would lose the oldest. A few seconds' worth.
RECORDER_IMU = QoSProfile(depth=1024, reliability=ReliabilityPolicy.BEST_EFFORT, durability=DurabilityPolicy.VOLATILE,
                          history=HistoryPolicy.KEEP_LAST)
# The recorder's commands: reliable, and a queue deep enough for a recorder that falls behind for a
# few seconds (a reader's KEEP_LAST queue drops its oldest messages when full, reliable or not).
RECORDER_COMMANDS = QoSProfile(depth=1024, reliability=ReliabilityPolicy.RELIABLE,
                               durability=DurabilityPolicy.VOLATILE, history=HistoryPolicy.KEEP_LAST)
# Commands must not be dropped (a lost zero twist would leave the robot moving). A reliable writer
# also serves best-effort readers, so replayed streams use it too.
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE,
                      history=HistoryPolicy.KEEP_LAST)
# The instruction: latched, so a node that starts later still gets the current one. Writers keep the
# last message only; readers queue a few.
LATCHED_WRITER = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL, history=HistoryPolicy.KEEP_LAST)
LATCHED_READER = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.TRANSIENT_LOCAL, history=HistoryPolicy.KEEP_LAST)
# Episode info, written and read: latched too, and every message matters (an episode's end and the
# next one's start are published back to back): a writer keeping only the last would replace an end
# that a recorder behind by a few seconds has not received yet with the next start.
EPISODES = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL, history=HistoryPolicy.KEEP_LAST)
