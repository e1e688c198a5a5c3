"""Request bodies as clients send them."""

from __future__ import annotations

import io

import numpy as np


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    """``array`` as numpy.save writes it: an ``application/x-npy`` request body."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()
