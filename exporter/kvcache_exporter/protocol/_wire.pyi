"""Type stub of the compiled decode stage (``_wire.c``); see ``compiled.py``."""

class Walker:
    pending: int
    events: int
    rows: int
    last_ts: float
    dp_rank: int | None
    feed_counts: tuple[int, int, int, int] | None
    def __init__(self, max_events: int, max_hashes: int) -> None: ...
    def feed(self, payload: bytes | memoryview, /) -> int: ...
    def labels(
        self,
    ) -> tuple[
        list[str | int | None],
        list[str | int | None],
        list[str | int | None],
        list[str | int | None],
        list[tuple[str | int | None, str | int | None, str | int | None]],
    ]: ...
    def flush(
        self, media: bytes, reasons: bytes, groups: bytes, adapters: bytes, /
    ) -> tuple[
        bytearray,
        bytearray,
        bytearray,
        bytearray,
        bytearray,
        bytearray,
        bytearray,
        bytearray,
        bytearray,
        bytearray,
        bytearray,
        bytearray,
        tuple[int, int, int, int],
        int,
        int,
    ]: ...
    def reset(self) -> None: ...
