# The compiled segment apply (_apply.pyx); the reference is the rounds of apply.py. The
# arguments are positional, in the order _apply.pyx documents (rows, table columns, counters,
# histograms, outputs).
import numpy as np
import numpy.typing as npt

OP_CODES: tuple[int, int, int, int]
FLAGS: tuple[int, int, int, int, int]
STATES: tuple[int, int, int, int]

def apply_segment(
    *args: npt.NDArray[np.generic] | float | int | bool,
) -> tuple[int, int, int, int, int, int, int]: ...
def resolve_depths(*args: npt.NDArray[np.generic] | float | int) -> None: ...
