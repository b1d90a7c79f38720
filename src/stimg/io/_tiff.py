"""Lazy TIFF/OME-TIFF pyramids: level 0 as a dask ``(c, y, x)`` array, never decoded whole."""

from __future__ import annotations

from pathlib import Path


def tiff_level0(path: str | Path):
    """Level 0 of a (pyramidal) TIFF as a lazy ``(c, y, x)`` dask array, its axes and its number of levels.

    Accepts ``CYX``/``ZYX``/``YX`` (fluorescence, OME) and ``YXS`` (RGB, e.g. H&E) series.
    """
    import dask.array as da
    import tifffile
    import zarr

    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            axes, n_levels = series.axes.upper(), len(series.levels)
    except (tifffile.TiffFileError, OSError) as e:
        msg = f"cannot read {str(path)!r} as a TIFF: {e}."
        raise ValueError(msg) from None
    node = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
    arr = da.from_zarr(node["0"] if n_levels > 1 else node)
    if axes == "YX":
        arr = arr[None]
    elif axes in ("YXS", "YXC"):
        arr = arr.transpose(2, 0, 1)[:3]
    elif axes not in ("CYX", "ZYX", "SYX"):
        msg = f"{path.name}: unsupported TIFF axes {axes!r} (expected CYX, ZYX, YX or YXS)."
        raise ValueError(msg)
    return arr, axes, n_levels
