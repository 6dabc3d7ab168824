# The compiled block-table kernels (_table.pyx); the numpy reference is in table.py.
import numpy as np
import numpy.typing as npt

STATES: tuple[int, int, int, int]

def find(
    key: npt.NDArray[np.uint64],
    medium: npt.NDArray[np.uint8],
    state: npt.NDArray[np.uint8],
    t_access: npt.NDArray[np.float64],
    horizon: float,
    keys: npt.NDArray[np.uint64],
    media: npt.NDArray[np.uint8],
    out: npt.NDArray[np.int64],
) -> None: ...
def insert(
    key: npt.NDArray[np.uint64],
    medium: npt.NDArray[np.uint8],
    state: npt.NDArray[np.uint8],
    t_access: npt.NDArray[np.float64],
    horizon: float,
    keys: npt.NDArray[np.uint64],
    media: npt.NDArray[np.uint8],
    new_state: int,
    out: npt.NDArray[np.int64],
) -> int: ...
