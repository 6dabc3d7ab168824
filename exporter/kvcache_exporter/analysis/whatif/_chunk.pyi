# The compiled chunk of the what-if model (_chunk.pyx); the reference is model.py's numpy
# passes. The arguments are positional, in the order _chunk.pyx documents.
import numpy as np
import numpy.typing as npt

OP_CODES: tuple[int, int]
STATES: tuple[int, int, int, int]
STOPPED_FOR: tuple[int, int]

def apply_chunk(
    *args: npt.NDArray[np.generic] | float | int | bool,
) -> tuple[int, int, int, int, int, int, int, int, int]: ...
