"""autosp: automatic sequence parallelism for PyTorch training, as a torch.compile pass."""

from autosp.api import SequenceParallel, parallelize
from autosp.comm.ops import count_collectives
from autosp.config import Config
from autosp.errors import AutoSPError, CollectiveError, InputMismatchError
from autosp.shards import gather_sequence

__all__ = [
    "AutoSPError",
    "CollectiveError",
    "Config",
    "InputMismatchError",
    "SequenceParallel",
    "count_collectives",
    "gather_sequence",
    "parallelize",
]
__version__ = "0.1.0"
