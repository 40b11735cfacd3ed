"""A caller's Dataset as input: decoded images become lossless PNG in the `{bytes, path}` struct the
CPU stage reads, so the same pixels reach the exact path."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image
from ray.data.extensions import ArrowTensorArray

from pipeline.datasets import IMAGE_STRUCT, encode_images


def test_numpy_images_become_png_with_the_same_pixels():
    arrays = [np.random.default_rng(k).integers(0, 256, (5 + k, 7, 3), dtype=np.uint8) for k in range(2)]
    batch = pa.table({"id": ["a", "b"], "image": ArrowTensorArray.from_numpy(arrays)})
    out = encode_images(batch, "image", multi=False)
    assert out.schema.field("image").type == IMAGE_STRUCT and out.column("id").to_pylist() == ["a", "b"]
    for array, value in zip(arrays, out.column("image").to_pylist()):
        assert value["path"] is None
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(value["bytes"]))), array)


def test_pil_images_and_paths_share_a_column_of_structs():
    # How Ray Data stores a column of Python objects (from_items with PIL images).
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectArray

    image = Image.new("RGB", (4, 3), (10, 20, 30))
    column = ArrowPythonObjectArray.from_objects([image, "s3://b/k.png", None])
    out = encode_images(pa.table({"id": [1, 2, 3], "image": column}), "image", multi=False)
    first, second, third = out.column("image").to_pylist()
    assert Image.open(io.BytesIO(first["bytes"])).getpixel((0, 0)) == (10, 20, 30)
    assert second == {"bytes": None, "path": "s3://b/k.png"} and third is None
