"""A caller's own Ray Dataset as the job's input (`jobs.annotate.annotate`).

Its columns follow a manifest's rules (an id column, `image`/`images` or a named image column, an
optional `prompt`, questions and kept columns) and are checked the same way, from the Dataset's
schema, before anything runs. Besides what a manifest holds (bytes, URIs, `{bytes, path}`
structs), a Dataset may carry decoded images: numpy arrays (`ray.data.read_images`) or PIL
images. Those are encoded as PNG, which is lossless, so the CPU stage's one exact path decodes the
very same pixels and an answer does not depend on how the image reached the job.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.inputs import InputSpec
from pipeline.read import check_columns

KIND = "dataset"


def dataset_spec(ds: Any, id_column: str, image_column: str | None, keep: tuple[str, ...],
                 questions_column: str | None) -> tuple[InputSpec, bool]:
    """The input spec of a Dataset, its columns checked like a manifest's (raises ManifestError), and
    whether its images are decoded ones (tensors or Python objects) to encode first."""
    schema = ds.schema()
    if schema is None:
        raise ValueError("the Dataset has no schema (is it empty?)")
    types = dict(zip(schema.names, schema.types))
    plain = pa.schema([pa.field(name, _plain(typ)) for name, typ in types.items()])
    columns = check_columns(plain, id_column, keep, "(the Dataset)", image_column, questions_column)
    decoded = not isinstance(types[columns.image], pa.DataType) or isinstance(types[columns.image], pa.ExtensionType)
    return InputSpec(KIND, columns), decoded


def _plain(typ: Any) -> pa.DataType:
    """A column's Arrow type as the checks read it: Ray's tensor and object columns as binary."""
    if not isinstance(typ, pa.DataType) or isinstance(typ, pa.ExtensionType):
        return pa.binary()
    return typ


def encoded(value: Any) -> Any:
    """A decoded image (numpy array, PIL image) as PNG bytes; any other source as it is."""
    if isinstance(value, np.ndarray):
        value = Image.fromarray(value)
    if isinstance(value, Image.Image):
        out = io.BytesIO()
        value.save(out, format="PNG")
        return out.getvalue()
    return value


IMAGE_STRUCT = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])


def _as_struct(value: Any) -> dict[str, Any] | None:
    """One source as the `{bytes, path}` struct the CPU stage reads (so bytes and URIs can share a
    column); an unknown kind of value goes on as text, and fails in the CPU stage as its row's error."""
    value = encoded(value)
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(value), "path": None}
    return {"bytes": None, "path": value if isinstance(value, str) else repr(value)}


def encode_images(batch: pa.Table, column: str, multi: bool) -> pa.Table:
    """Plan stage: the image column's values (Ray's tensor or Python-object columns: decoded images,
    or bytes and URIs mixed) as `{bytes, path}` structs, decoded images as PNG bytes; every other
    column untouched."""
    values = [v for chunk in batch.column(column).chunks
              for v in (chunk.to_numpy() if isinstance(chunk.type, pa.ExtensionType) else chunk.to_pylist())]
    images = [[_as_struct(i) for i in v] if multi and v is not None else _as_struct(v) for v in values]
    typ = pa.list_(IMAGE_STRUCT) if multi else IMAGE_STRUCT
    return batch.set_column(batch.schema.get_field_index(column), column, pa.array(images, typ))
