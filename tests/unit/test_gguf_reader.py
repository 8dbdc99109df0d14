"""tuneforge.model.gguf_reader against gguf-py's own GGUFReader: every field (offset, parts with their dtypes and
shapes, data indexes, types, contents) and every tensor, on the embedded model's file (49k-token vocabulary and
merges) and on files gguf-py's writer makes with every value type, in both byte orders."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.constants import GGUFValueType as T

from tuneforge.config import EMBEDDED_MODEL
from tuneforge.model.gguf_reader import open_gguf
from tuneforge.model.load import _embedded_gguf_path


def assert_same_reading(path) -> None:
    ours, theirs = open_gguf(path), gguf.gguf_reader.GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for key, expected in theirs.fields.items():
        field = ours.fields[key]
        assert (field.offset, field.name, field.data, field.types) == (
            expected.offset, expected.name, expected.data, expected.types), key
        assert len(field.parts) == len(expected.parts), key
        for part, other in zip(field.parts, expected.parts):
            assert (part.dtype, part.shape) == (other.dtype, other.shape) and np.array_equal(part, other), key
        assert field.contents() == expected.contents(), key
    assert (ours.data_offset, ours.alignment, ours.byte_order) == (theirs.data_offset, theirs.alignment,
                                                                    theirs.byte_order)
    assert len(ours.tensors) == len(theirs.tensors)
    for tensor, expected in zip(ours.tensors, theirs.tensors):
        assert (tensor.name, tensor.tensor_type, tensor.n_elements, tensor.n_bytes, tensor.data_offset) == (
            expected.name, expected.tensor_type, expected.n_elements, expected.n_bytes, expected.data_offset)
        assert np.array_equal(tensor.shape, expected.shape) and tensor.field.parts[0] == expected.field.parts[0]
        assert (tensor.data.dtype, tensor.data.shape) == (expected.data.dtype, expected.data.shape)
        assert np.array_equal(tensor.data, expected.data), tensor.name


def test_the_embedded_model_reads_as_gguf_py_reads_it():
    assert_same_reading(_embedded_gguf_path(EMBEDDED_MODEL))


@pytest.mark.parametrize("endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])  # big: gguf-py's own path
def test_every_value_type_reads_as_gguf_py_reads_it(tmp_path, endian):
    path = tmp_path / "values.gguf"
    writer = gguf.GGUFWriter(path, "llama", endianess=endian)
    scalars = {T.UINT8: 200, T.INT8: -100, T.UINT16: 60000, T.INT16: -30000, T.UINT32: 4_000_000_000,
               T.INT32: -2_000_000_000, T.FLOAT32: 1.5, T.UINT64: 2**63 + 5, T.INT64: -(2**62), T.FLOAT64: 0.1,
               T.BOOL: True}
    for kind, value in scalars.items():
        writer.add_key_value(f"test.{kind.name.lower()}", value, kind)
        writer.add_key_value(f"test.{kind.name.lower()}_array", [value, value, value], T.ARRAY, sub_type=kind)
        writer.add_key_value(f"test.{kind.name.lower()}_one", [value], T.ARRAY, sub_type=kind)
    writer.add_key_value("test.string", "naïve ✓", T.STRING)
    writer.add_key_value("test.empty_string", "", T.STRING)
    writer.add_key_value("test.strings", ["", "a", "naïve ✓", "x" * 300], T.ARRAY, sub_type=T.STRING)
    writer.add_key_value("test.nested", [[1, 2], [3]], T.ARRAY, sub_type=T.ARRAY)
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((4, 64)).astype(np.float32)
    writer.add_tensor("f32", weights)
    writer.add_tensor("f16", weights.astype(np.float16))
    writer.add_tensor("q8_0", gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_same_reading(path)
    reader = open_gguf(path)
    assert reader.fields["test.strings"].contents() == ["", "a", "naïve ✓", "x" * 300]
    assert reader.fields["test.int64_array"].contents() == [-(2**62)] * 3
    data = np.asarray(next(t for t in reader.tensors if t.name == "f32").data)
    assert np.array_equal(data.astype(np.float32) if endian == gguf.GGUFEndian.LITTLE else data.byteswap().view(
        data.dtype.newbyteorder()).astype(np.float32), weights)
