"""gguf-py's GGUFReader, parsing the same fields and tensors in a tenth of the time.

GGUFReader parses every metadata value into numpy views of the file: two per string, so a 49k-token vocabulary and
its 49k merges are ~200k views, each made by five numpy calls (a dtype built only to read its item size, a slice of
np.memmap, which runs numpy's memmap bookkeeping in Python, two views and a byte-order view), plus an enum lookup and
a recursive call per array element. That is 3 s for SmolLM2's file, paid on every read (an export test reads each
file it compares; a conversion reads the model's file). `GGUFReader` below is the same class with three cheaper
steps, the result identical field by field and tensor by tensor (tests/unit/test_gguf_reader.py):
- the map is held as a plain ndarray view of the np.memmap (the pages are still mapped, not read);
- `_get` in the file's own byte order (every GGUF that is not byte-swapped) is one slice and one view;
- an array is read in one pass: numbers as one view cut into gguf-py's one-element parts, strings walked with
  struct over the mapped bytes (one slice per length, one per string).
Byte-swapped files take gguf-py's own path.
"""

from __future__ import annotations

import struct

from gguf import gguf_reader
import numpy as np
from gguf.constants import GGUFValueType

ARRAY, STRING = GGUFValueType.ARRAY, GGUFValueType.STRING  # enum attribute lookups are slow in a loop
_DTYPES: dict = {}  # what _get is asked for -> its np.dtype
_U64 = np.dtype(np.uint64)
_U32 = np.dtype(np.uint32)


class GGUFReader(gguf_reader.GGUFReader):  # the module's class: gguf_parsed_once swaps gguf.GGUFReader
    @property
    def data(self) -> np.ndarray:
        return self._map

    @data.setter
    def data(self, value: np.ndarray) -> None:
        # gguf-py's __init__ assigns np.memmap(path); slices of a plain view of it skip memmap's Python bookkeeping.
        # The view's .base keeps the map open as long as the reader and every part it handed out.
        self._map = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    def _get(self, offset, dtype, count=1, override_order=None):
        if self.byte_order != "I" or override_order is not None:
            return super()._get(offset, dtype, count, override_order)
        dtype = _DTYPES.get(dtype) or _DTYPES.setdefault(dtype, np.dtype(dtype))
        count = int(count)
        return self._map[offset:offset + dtype.itemsize * count].view(dtype)[:count]

    def _get_field_parts(self, orig_offs, raw_type):
        if self.byte_order != "I" or raw_type != ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        item_type = self._get(orig_offs, _U32)
        length = self._get(orig_offs + 4, _U64)
        count, offs = int(length[0]), orig_offs + 12
        # The parts gguf-py makes: [item type, length, then each item's parts]; data indexes each item's value.
        parts: list[np.ndarray] = [item_type, length]
        item = GGUFValueType(int(item_type[0]))
        scalar = self.gguf_scalar_to_np.get(item)
        if scalar is not None:  # one one-element view per item, as gguf-py's recursion makes them
            size = np.dtype(scalar).itemsize
            block = self._get(offs, scalar, count)
            parts += (block[i:i + 1] for i in range(count))
            offs += size * count
            indexes = list(range(2, len(parts)))
        elif item == STRING:  # each string's length and bytes
            data, raw = self._map, memoryview(self._map)
            unpack = struct.Struct("=Q").unpack_from  # byte order "I": the file's is the host's
            for _ in range(count):
                (size,) = unpack(raw, offs)
                parts.append(data[offs:offs + 8].view(_U64))
                parts.append(data[offs + 8:offs + 8 + size])
                offs += 8 + size
            indexes = list(range(3, len(parts), 2))
        else:  # arrays of arrays: gguf-py's recursion
            return super()._get_field_parts(orig_offs, raw_type)
        return offs - orig_offs, parts, indexes, [ARRAY] + ([item] if count else [])  # as gguf-py types them


def open_gguf(path, mode: str = "r") -> GGUFReader:
    """A parsed GGUF file: gguf-py's reader, faster (above)."""
    return GGUFReader(path, mode)
