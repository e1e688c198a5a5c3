"""Hand-written .npy bodies for the handler and server tests: any descr, shape, header length
and version, and a seeded draw of such bodies (most malformed, some valid)."""

from __future__ import annotations

import numpy as np

DESCRS: list = [
    "|V0", "|V8", "<U0", "<U3", "|S0", "|S4", "|b1", "|u1", "|i1", "<i8", "<c8", "<M8[s]",
    "<f2", "<f4", ">f4", "<f8", "=f4", "|O", "f0", "zz", "", "<f4 ",
    [("r", "|u1"), ("g", "|u1"), ("b", "|u1")], [("x", "<f4")], [("", "|V0")],
    [("a", "<f4", (3,))], ("<f4", (3,)),
]
SHAPES: list = [
    (), (0,), (1, 3, 32, 32), (0, 3, 32, 32), (3, 32, 32), (2, 3, 32, 32), (1, 3, 32),
    (1, 3, 32, 32, 1), (1, 0, 32, 32), (-1, 3, 32, 32), (2**31, 3, 32, 32), (2**40, 3, 32, 32),
    (2**62, 3, 32, 32), (10**30, 3, 32, 32), (2048, 3, 32, 32), "(1, 3, 32, 32", "[1, 3, 32, 32]",
]


def crafted_npy(descr, shape, fortran=False, data: bytes | None = None,
                length_delta: int = 0, version: tuple[int, int] = (1, 0)) -> bytes:
    """A .npy body with the header written by hand: any descr, shape (or text in its place),
    fortran flag, declared header length (``length_delta`` off the true one) and version."""
    shape_text = shape if isinstance(shape, str) else repr(tuple(shape))
    header = f"{{'descr': {descr!r}, 'fortran_order': {fortran!r}, 'shape': {shape_text}, }}"
    length_bytes = 2 if version == (1, 0) else 4
    header += " " * (-(len(header) + 7 + length_bytes) % 64) + "\n"
    declared = max(0, min(len(header) + length_delta, 2 ** (8 * length_bytes) - 1))
    if data is None:  # the data the header announces, up to 64 KiB
        data = bytes(min(_announced_bytes(descr, shape), 64 * 1024))
    return (b"\x93NUMPY" + bytes(version) + declared.to_bytes(length_bytes, "little")
            + header.encode("latin1") + data)


def _announced_bytes(descr, shape) -> int:
    try:
        return max(0, int(np.prod(shape, dtype=object)) * np.dtype(descr).itemsize)
    except Exception:
        return 0


def crafted_npy_cases(rng: np.random.Generator, n: int) -> list[tuple[str, bytes]]:
    """Seeded (description, body) pairs drawn across descrs, shapes, fortran flags, data
    lengths, header lengths and versions; most are malformed, some are valid."""
    cases = []
    for _ in range(n):
        if rng.random() < 0.1:
            cases.append(_valid_npy_case(rng))
            continue
        descr = DESCRS[int(rng.integers(len(DESCRS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        fortran = [False, True, "yes", None][int(rng.integers(4))]
        version = [(1, 0), (1, 0), (1, 0), (2, 0), (3, 0), (9, 9)][int(rng.integers(6))]
        length_delta = [0, 0, 0, -1, 1, -64, 64, -10**6, 10**6][int(rng.integers(9))]
        full = _announced_bytes(descr, shape)
        data_length = [None, None, 0, max(0, full - 1), full + 7][int(rng.integers(5))]
        data = None if data_length is None else rng.bytes(min(data_length, 64 * 1024))
        body = crafted_npy(descr, shape, fortran, data, length_delta, version)
        cases.append((f"descr={descr!r} shape={shape!r} fortran={fortran!r} v={version} "
                      f"length{length_delta:+d} data={data_length}", body))
    return cases


def _valid_npy_case(rng: np.random.Generator) -> tuple[str, bytes]:
    """A well-formed body with a hand-written header: pixels in a dtype the model takes."""
    descr = ["|u1", "<f4", ">f4", "<f2", "<f8", "=f4"][int(rng.integers(6))]
    shape = [(3, 32, 32), (2, 3, 32, 32), (5, 3, 32, 32)][int(rng.integers(3))]
    fortran = bool(rng.integers(2))
    pixels = rng.random(shape)
    array = (pixels * 255).astype(descr) if descr == "|u1" else pixels.astype(descr)
    data = array.tobytes(order="F" if fortran else "C")
    return f"valid descr={descr} shape={shape} fortran={fortran}", crafted_npy(
        descr, shape, fortran, data)
