"""Types of the compiled loops (merger/core/_floatconv.c, TIES's in _ties.c); `src` and `dst` are any objects
with the buffer protocol (numpy arrays, bytearray, memoryview), checked when called. TIES's histogram
and election take values stored as codes: 0 float32, 1 float16, 2 bfloat16, and the widest loops to use
(`tier`: 2 AVX-512, 1 AVX2, 0 portable; `simd()` is the CPU's widest), which give the same results."""

def f16_to_f32(src: object, dst: object, portable: bool = False, /) -> None: ...
def f32_to_f16(src: object, dst: object, portable: bool = False, /) -> None: ...
def bf16_to_f32(src: object, dst: object, portable: bool = False, /) -> None: ...
def f32_to_bf16(src: object, dst: object, portable: bool = False, /) -> None: ...
def count_masked16(src: object, mask: int, /) -> int: ...
def count_masked32(src: object, mask: int, /) -> int: ...
def magnitude_hist16(
    src: object,
    counts: object,
    high: int,
    minus: object = None,
    fine: object = None,
    window: int = 0,
    src_code: int = 0,
    minus_code: int = 0,
    tier: int = 2,
    /,
) -> None: ...
def elect(
    base: object,
    out: object,
    models: list[tuple[object, int, object, int, int, float, float, float]]
    | list[tuple[object, int, object, int, int, float, float, float, int]],
    consensus: int,
    normalize: bool,
    scale: float,
    base_code: int = 0,
    tier: int = 2,
    /,
) -> list[int]: ...
def simd() -> int: ...
