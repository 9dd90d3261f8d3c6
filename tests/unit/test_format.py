"""The on-disk format: exact round trips, interoperability, and strict rejection of bad files."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from spotckpt.errors import CheckpointCorruptError, PickleRefusedError, StateError
from spotckpt.format import (
    FORMAT,
    FileEntry,
    Manifest,
    SafetensorsFile,
    crc32c_b64,
    decode_tree,
    encode_tree,
    file_crc32c,
    parse_step_dirname,
    safe_relpath,
    step_dirname,
    write_safetensors,
)


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _all_dtype_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    out = {
        "f32": base,
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "f64": base.double(),
        "i8": torch.randint(-128, 127, (5,), dtype=torch.int8, generator=g),
        "i16": torch.randint(-1000, 1000, (5,), dtype=torch.int16, generator=g),
        "i32": torch.randint(-(2**31), 2**31 - 1, (5,), dtype=torch.int32, generator=g),
        "i64": torch.tensor([-(2**63), 2**63 - 1, 0]),
        "u8": torch.arange(256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar0d": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "noncontig_t": base.t(),
        "noncontig_slice": base[1:5:2, ::3],
        "view_a": base[0],
        "view_b": base[0, 2:6],
    }
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):
            out[name] = base.to(getattr(torch, name))
    for name in ("uint16", "uint32", "uint64"):
        if hasattr(torch, name):
            out[name] = torch.tensor([0, 1, 7], dtype=getattr(torch, name))
    return out


def test_safetensors_round_trip_every_dtype(tmp_path: Path) -> None:
    ts = _all_dtype_tensors()
    entry = write_safetensors(tmp_path / "x.safetensors", ts)
    size, crc = file_crc32c(tmp_path / "x.safetensors")
    assert entry == FileEntry(size, crc32c_b64(crc))
    with SafetensorsFile(tmp_path / "x.safetensors") as r:
        assert set(r.keys()) == set(ts)
        for k, v in ts.items():
            got = r.read(k)
            assert got.dtype == v.dtype and got.shape == v.shape, k
            assert torch.equal(_u8(got), _u8(v)), k
            target = torch.empty_like(v.contiguous())
            r.read_into(k, target)
            assert torch.equal(_u8(target), _u8(v)), k


def test_read_into_non_contiguous_target(tmp_path: Path) -> None:
    src = torch.arange(12.0).reshape(3, 4)
    write_safetensors(tmp_path / "x.safetensors", {"a": src.t().contiguous()})
    target = torch.zeros(3, 4).t()  # non-contiguous view
    with SafetensorsFile(tmp_path / "x.safetensors") as r:
        r.read_into("a", target)
    assert torch.equal(target, src.t())


def test_interoperates_with_reference_safetensors(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    ts = {k: v for k, v in _all_dtype_tensors().items() if k not in ("uint32", "uint64")}
    write_safetensors(tmp_path / "ours.safetensors", ts)
    theirs = st.load_file(str(tmp_path / "ours.safetensors"))
    for k, v in ts.items():
        assert torch.equal(_u8(theirs[k]), _u8(v)) and theirs[k].shape == v.shape, k
    st.save_file({k: v.clone().contiguous() for k, v in ts.items()}, str(tmp_path / "theirs.safetensors"))
    with SafetensorsFile(tmp_path / "theirs.safetensors") as r:
        for k, v in ts.items():
            assert torch.equal(_u8(r.read(k)), _u8(v)), k


def test_tree_round_trips_types_exactly() -> None:
    tensors: dict[str, torch.Tensor] = {}

    def add(path: str, t: torch.Tensor) -> str:
        tensors[path] = t
        return path

    rs = np.random.RandomState(5)
    value = {
        "ints": {0: 1, 1: -(2**70)},
        "tuple": (1, 2.5, "x", None, True),
        "nested": [[], {}, ()],
        "floats": [math.inf, -math.inf, math.nan, -0.0, 1e-300, 0.1],
        "np_state": rs.get_state(),
        "np_gen": np.random.default_rng(3).bit_generator.state,
        "np_arr": np.arange(6, dtype=np.int16).reshape(2, 3),
        "np_scalar": np.float32(1.5),
        "bytes": b"\x00\xff",
        "dtype": torch.bfloat16,
        "size": torch.Size([2, 3]),
        "device": torch.device("cpu"),
        "tensor": torch.ones(2),
        "__tricky__": 1,
        "bools": [True, False],
        "mixed_keys": {1: "a", "1": "b", (1, 2): "c", None: "d", 2.5: "e"},
        "single_dunder": {"__tensor__": "not a tensor"},
    }
    doc = json.loads(json.dumps(encode_tree(value, "v", add), allow_nan=False))
    back = decode_tree(doc, tensors.__getitem__)
    assert back["ints"] == {0: 1, 1: -(2**70)} and isinstance(back["tuple"], tuple)
    assert back["tuple"] == (1, 2.5, "x", None, True)
    assert back["nested"] == [[], {}, ()]
    f = back["floats"]
    assert f[0] == math.inf and f[1] == -math.inf and math.isnan(f[2])
    assert math.copysign(1.0, f[3]) == -1.0 and f[4] == 1e-300 and f[5] == 0.1
    st = back["np_state"]
    assert st[0] == "MT19937" and np.array_equal(st[1], rs.get_state()[1]) and st[1].dtype == np.uint32
    np.random.RandomState().set_state(st)  # accepted by numpy as is
    assert back["np_gen"] == np.random.default_rng(3).bit_generator.state
    assert back["np_arr"].dtype == np.int16 and np.array_equal(back["np_arr"], value["np_arr"])
    assert back["np_scalar"] == np.float32(1.5) and back["np_scalar"].dtype == np.float32
    assert back["bytes"] == b"\x00\xff"
    assert back["dtype"] is torch.bfloat16 and back["size"] == torch.Size([2, 3])
    assert back["device"] == torch.device("cpu")
    assert torch.equal(back["tensor"], torch.ones(2))
    assert back["__tricky__"] == 1 and back["bools"] == [True, False]
    assert back["mixed_keys"] == value["mixed_keys"]
    assert back["single_dunder"] == {"__tensor__": "not a tensor"}


def test_unsupported_value_names_key_path() -> None:
    with pytest.raises(StateError) as ei:
        encode_tree({"a": {"b": [1, object()]}}, "state", lambda p, t: p)
    assert ei.value.key_path == "state/a/b/1"
    assert "state/a/b/1" in str(ei.value)
    with pytest.raises(StateError):
        encode_tree({"c": torch.zeros(2, dtype=torch.complex64)}, "s", lambda p, t: p)


def test_pickle_only_with_opt_in() -> None:
    class Thing:
        pass

    doc = encode_tree({"x": {1, 2}}, "s", lambda p, t: p, allow_pickle=True)
    with pytest.raises(PickleRefusedError):
        decode_tree(doc, lambda n: torch.zeros(1))
    assert decode_tree(doc, lambda n: torch.zeros(1), allow_pickle=True) == {"x": {1, 2}}
    with pytest.raises(StateError):
        encode_tree(Thing(), "s", lambda p, t: p)


def _write_raw(path: Path, header: object, data: bytes = b"", *, length: int | None = None) -> None:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)


@pytest.mark.parametrize(
    "header,data,length,why",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "outside"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 9, None, "cover"),
        ({"a": {"dtype": "XX", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "dtype"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "shape needs"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "overlap"),
        (b"{not json", b"", None, "JSON"),
        (b"[1, 2]", b"", None, "object"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 10**12, "header claims"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, None, "outside"),
    ],
)
def test_hostile_safetensors_headers_are_refused(tmp_path: Path, header: object, data: bytes, length: int | None, why: str) -> None:
    p = tmp_path / "bad.safetensors"
    _write_raw(p, header, data, length=length)
    with pytest.raises(CheckpointCorruptError) as ei:
        SafetensorsFile(p)
    assert why in str(ei.value)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"a": torch.ones(1000)})
    raw = p.read_bytes()
    for cut in (0, 5, 20, len(raw) - 1):
        p.write_bytes(raw[:cut])
        with pytest.raises(CheckpointCorruptError):
            SafetensorsFile(p)


def _manifest_doc(**over: object) -> bytes:
    doc = {"format": FORMAT, "step": 7, "created": "2026-01-01T00:00:00Z",
           "files": {"rank-00000.safetensors": {"size": 4, "crc32c": crc32c_b64(0)}}}
    doc.update(over)
    return json.dumps(doc).encode()


def test_manifest_round_trip() -> None:
    m = Manifest(step=12, files={"rank-00000.safetensors": FileEntry(3, crc32c_b64(123))}, extra={"world_size": 1})
    back = Manifest.from_bytes(m.to_bytes())
    assert back == m and back.to_bytes() == m.to_bytes()
    doc = json.loads(m.to_bytes())
    assert doc["format"] == "spotckpt/1" and doc["step"] == 12 and doc["created"].endswith("Z")
    assert doc["files"]["rank-00000.safetensors"] == {"size": 3, "crc32c": crc32c_b64(123)}


@pytest.mark.parametrize(
    "over",
    [
        {"format": "spotckpt/2"},
        {"format": None},
        {"step": -1},
        {"step": "7"},
        {"step": True},
        {"created": 5},
        {"files": {}},
        {"files": {"../evil": {"size": 1, "crc32c": "AAAAAA=="}}},
        {"files": {"/etc/passwd": {"size": 1, "crc32c": "AAAAAA=="}}},
        {"files": {"a/../../b": {"size": 1, "crc32c": "AAAAAA=="}}},
        {"files": {"manifest.json": {"size": 1, "crc32c": "AAAAAA=="}}},
        {"files": {"a\\..\\b": {"size": 1, "crc32c": "AAAAAA=="}}},
        {"files": {"ok": {"size": -1, "crc32c": "AAAAAA=="}}},
        {"files": {"ok": {"size": 1, "crc32c": "not base64!"}}},
        {"files": {"ok": {"size": 1, "crc32c": "AAAA"}}},
    ],
)
def test_hostile_manifests_are_refused(over: dict[str, object]) -> None:
    with pytest.raises(CheckpointCorruptError):
        Manifest.from_bytes(_manifest_doc(**over))


def test_manifest_garbage() -> None:
    for data in (b"", b"\xff\xfe", b"[]", b"null", b"{" * 10):
        with pytest.raises(CheckpointCorruptError):
            Manifest.from_bytes(data)


def test_step_names_sort_as_steps() -> None:
    names = [step_dirname(s) for s in (5, 1200, 99, 10**11)]
    assert sorted(names) == [step_dirname(s) for s in sorted((5, 1200, 99, 10**11))]
    assert step_dirname(1200) == "step-000000001200"
    assert parse_step_dirname("step-000000001200") == 1200
    for bad in ("step-1200", "step-0000000012000", "step-00000000120a", ".step-000000001200"):
        assert parse_step_dirname(bad) is None


def test_safe_relpath() -> None:
    assert safe_relpath("rank-00000.safetensors") == "rank-00000.safetensors"
    assert safe_relpath("sub/file.bin") == "sub/file.bin"
    assert safe_relpath(".metadata") == ".metadata"  # torch.distributed.checkpoint's, in adopted folders
    assert safe_relpath("pytorch_model_fsdp_0/.metadata") == "pytorch_model_fsdp_0/.metadata"
    for bad in ("", "..", "../x", "a/../..", "/abs", "a//b", "./a", "a/./b", "a\x00b", 5, None, "manifest.json"):
        with pytest.raises(CheckpointCorruptError):
            safe_relpath(bad)
