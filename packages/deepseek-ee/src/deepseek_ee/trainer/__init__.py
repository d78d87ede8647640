"""EE's distributed training: DistributedTrainer (Lightning DDP/FSDP, multi-node) and its parts."""

from .distributed import DistributedTrainer, DistributedTrainResult
from .watchdog import EXIT_PEER_LOST, PeerLostError

__all__ = ["EXIT_PEER_LOST", "DistributedTrainResult", "DistributedTrainer", "PeerLostError"]
