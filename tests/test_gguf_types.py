"""Every GGUF tensor type the ``gguf`` package can dequantize loads (Q5_0 and Q5_1 among
them, which transformers' own reader refuses), and any other type is refused by name."""

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from weights_conversion.gguf import dequantize_tensor, read_header  # noqa: E402
from weights_conversion.sources import CorruptCheckpointError  # noqa: E402

# the types gguf can write from floats; K- and I-quants it can only read (the real Gemma 3
# file in test_gemma3.py holds Q4_K and Q6_K next to Q5_0 and Q8_0)
WRITABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.TQ2_0, T.MXFP4]


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, T]]) -> Path:
    """A GGUF file of these tensors, given as gguf.quants.quantize returns them (bytes for block types)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (data, kind) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_every_type_gguf_can_quantize_reads_as_gguf_dequantizes_it(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((8, 256)).astype(np.float32)
    quantized = {kind.name: quantize(values, kind) for kind in WRITABLE}
    path = _write(tmp_path / "types.gguf", {f"t.{k}": (q, T[k]) for k, q in quantized.items()})
    header = read_header(path)
    blob = np.memmap(path, mode="r", dtype=np.uint8)
    for info in header.tensors:
        kind = T[info.name.removeprefix("t.")]
        assert info.shape == values.shape and info.ggml_type == kind.value
        start = header.data_start + info.offset
        ours = dequantize_tensor(blob[start : start + info.nbytes], info, str(path))
        expected = torch.from_numpy(dequantize(quantized[kind.name], kind).astype(np.float32)).reshape(values.shape)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0, msg=f"{kind.name} differs from gguf's")


def test_a_type_nothing_can_dequantize_is_refused_by_name(tmp_path):
    # Q8_1 is an intermediate type of llama.cpp's matmuls: gguf knows its size, not how to read it
    raw = np.zeros((4, 40), dtype=np.uint8)  # 4 blocks of 32 values, 40 bytes each
    path = _write(tmp_path / "q8_1.gguf", {"blk.0.attn_q.weight": (raw, T.Q8_1)})
    header = read_header(path)
    (info,) = header.tensors
    assert info.shape == (4, 32)
    start = header.data_start + info.offset
    blob = np.memmap(path, mode="r", dtype=np.uint8)
    with pytest.raises(CorruptCheckpointError, match=r"'blk\.0\.attn_q\.weight'.*Q8_1 cannot be dequantized"):
        dequantize_tensor(blob[start : start + info.nbytes], info, str(path))
