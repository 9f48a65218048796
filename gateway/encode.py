"""Pixel data encoder: pydicom 3.1's ``set_pixel_data`` contract, bool masks included (pure).

Work in progress: the signature is final; the bool path and the full refusal table follow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydicom.pixels.utils import set_pixel_data as _pydicom_set_pixel_data

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


def set_pixel_data(
    ds: Dataset,
    arr: np.ndarray,
    photometric_interpretation: str,
    bits_stored: int,
    *,
    generate_instance_uid: bool = True,
) -> None:
    """Set ``ds``'s Pixel Data and Image Pixel elements from ``arr`` (see module docs)."""
    _pydicom_set_pixel_data(
        ds, arr, photometric_interpretation, bits_stored, generate_instance_uid=generate_instance_uid
    )
