"""Checkpoint I/O (ldm/checkpoint.py): round trips, safe unpickling, atomic writes, strict loading with key reports."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ldm.checkpoint import (
    CheckpointKeyError,
    KeyReport,
    compare_keys,
    filter_prefix,
    load_state_dict,
    load_strict,
    read_metadata,
    save_state_dict,
)

import pytest
import torch
from torch import nn


class Trusted:
    """A plain object in a pickle: harmless, but weights_only loading must still refuse it."""

    def __init__(self) -> None:
        self.note = "not a tensor"


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.register_buffer("scale", torch.ones(4))


def _sd() -> dict[str, torch.Tensor]:
    return {
        "a.weight": torch.randn(3, 4),
        "a.bias": torch.randn(3),
        "half": torch.randn(5).to(torch.float16),
        "bf16": torch.randn(2, 2).to(torch.bfloat16),
        "step": torch.tensor(7),
    }


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt", ".pt", ".pth"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    sd = _sd()
    path = save_state_dict(sd, tmp_path / f"model{suffix}")
    assert path.is_file() and _leftovers(tmp_path) == []
    _assert_same(sd, load_state_dict(path))


def test_round_trip_views_shared_and_noncontiguous(tmp_path: Path) -> None:
    base = torch.randn(4, 6)
    sd = {"w": base, "tied": base, "t": base.t(), "row": base[1]}
    path = save_state_dict(sd, tmp_path / "m.safetensors")
    loaded = load_state_dict(path)
    for key, value in sd.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert sd["tied"] is base  # the caller's tensors are never modified


def test_nested_state_dict_and_deepspeed_module_unwrap(tmp_path: Path) -> None:
    sd = _sd()
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 100, "lr": [0.1]}, tmp_path / "lightning.ckpt")
    torch.save({"module": sd, "buffer_names": ["x"], "optimizer": None}, tmp_path / "mp_rank_00_model_states.pt")
    _assert_same(sd, load_state_dict(tmp_path / "lightning.ckpt"))
    _assert_same(sd, load_state_dict(tmp_path / "mp_rank_00_model_states.pt"))


def test_non_tensor_entries_dropped_with_debug_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.save({"w": torch.ones(2), "epoch": 3, "name": "x"}, tmp_path / "flat.pth")
    with caplog.at_level(logging.DEBUG, logger="ldm.checkpoint"):
        loaded = load_state_dict(tmp_path / "flat.pth")
    assert list(loaded) == ["w"]
    assert "epoch" in caplog.text


def test_metadata_round_trip(tmp_path: Path) -> None:
    meta = {"config": "model:\n  unet: {}\n", "format": "pt", "step": "12"}
    st = save_state_dict(_sd(), tmp_path / "m.safetensors", metadata=meta)
    ck = save_state_dict(_sd(), tmp_path / "m.ckpt", metadata=meta)
    assert read_metadata(st) == meta
    assert read_metadata(ck) == meta
    assert read_metadata(save_state_dict(_sd(), tmp_path / "none.safetensors")) == {}
    with pytest.raises(TypeError, match="metadata must map str to str"):
        save_state_dict(_sd(), tmp_path / "bad.safetensors", metadata={"step": 12})  # type: ignore[dict-item]


def test_saved_file_permissions_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        for name in ("a.safetensors", "a.ckpt"):
            path = save_state_dict({"w": torch.zeros(2)}, tmp_path / name)
            assert path.stat().st_mode & 0o777 == 0o644, name  # not safetensors' private 0600 temp-file mode
    finally:
        os.umask(old)


def test_overwrite_refused_unless_asked(tmp_path: Path) -> None:
    path = save_state_dict({"w": torch.zeros(2)}, tmp_path / "m.safetensors")
    with pytest.raises(FileExistsError, match="m.safetensors"):
        save_state_dict({"w": torch.ones(2)}, path)
    torch.testing.assert_close(load_state_dict(path)["w"], torch.zeros(2))
    save_state_dict({"w": torch.ones(2)}, path, overwrite=True)
    torch.testing.assert_close(load_state_dict(path)["w"], torch.ones(2))
    assert _leftovers(tmp_path) == []


def test_unwritable_targets_give_clear_errors_and_no_temp_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_state_dict(_sd(), tmp_path / "missing_dir" / "m.safetensors")
    (tmp_path / "adir.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match="adir.safetensors"):
        save_state_dict(_sd(), tmp_path / "adir.safetensors", overwrite=True)
    with pytest.raises(ValueError, match="unknown extension"):
        save_state_dict(_sd(), tmp_path / "m.npz")
    assert _leftovers(tmp_path) == [] and not (tmp_path / "missing_dir").exists()


def test_read_only_directory(unwritable_dir: Path) -> None:
    with pytest.raises(PermissionError, match="not writable"):
        save_state_dict(_sd(), unwritable_dir / "m.safetensors")
    assert not (unwritable_dir / "m.safetensors").exists() and not list(unwritable_dir.glob(".m.safetensors*"))


def test_failed_write_removes_temp_file(tmp_path: Path) -> None:
    # Rejected before anything is written:
    with pytest.raises(ValueError, match="meta tensor"):
        save_state_dict({"w": torch.empty(2, device="meta")}, tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="'w' is a int"):
        save_state_dict({"w": 3}, tmp_path / "m.ckpt")  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="'w' is a torch.sparse_coo tensor"):
        save_state_dict({"w": torch.zeros(3).to_sparse()}, tmp_path / "m.safetensors")
    # Failing inside the writer, after the temporary file exists:
    unpicklable = torch.zeros(2)
    unpicklable.hook = lambda: None  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="pickle"):
        save_state_dict({"w": unpicklable}, tmp_path / "m.ckpt")
    assert list(tmp_path.iterdir()) == []


def test_load_errors_are_one_line_and_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"w\.npz: unknown checkpoint extension"):
        load_state_dict(tmp_path / "w.npz")
    (tmp_path / "zero_ckpt").mkdir()
    with pytest.raises(IsADirectoryError, match="zero_to_fp32"):
        load_state_dict(tmp_path / "zero_ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"definitely not a checkpoint" * 10)
    with pytest.raises(ValueError, match=r"junk\.ckpt: not a readable torch checkpoint") as info:
        load_state_dict(tmp_path / "junk.ckpt")
    assert "\n" not in str(info.value) and "unsafe" not in str(info.value)


@pytest.mark.parametrize("keep", [0, 5, 40, -9])
def test_truncated_safetensors(tmp_path: Path, keep: int) -> None:
    path = save_state_dict(_sd(), tmp_path / "full.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=r"cut\.safetensors: not a valid safetensors file") as info:
        load_state_dict(cut)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"cut\.safetensors"):
        read_metadata(cut)


def test_truncated_ckpt(tmp_path: Path) -> None:
    path = save_state_dict(_sd(), tmp_path / "full.ckpt")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"cut\.ckpt: not a readable torch checkpoint"):
        load_state_dict(cut)


def test_pickle_with_objects_refused_unless_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "obj.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "callback": Trusted()}, path)
    with pytest.raises(ValueError, match="non-tensor objects") as info:
        load_state_dict(path)
    message = str(info.value)
    assert "--unsafe-pickle" in message and "obj.ckpt" in message and "Trusted" in message and "\n" not in message
    loaded = load_state_dict(path, unsafe_pickle=True)
    assert list(loaded) == ["w"]
    torch.testing.assert_close(loaded["w"], torch.ones(3))


def test_compare_keys_and_report() -> None:
    expected = {"a": torch.Size([2, 3]), "b": [4], "c": [[5], "float32"], "d": torch.zeros(1), "model_ema.a": [1]}
    got = {"a": torch.zeros(3, 2), "b": torch.zeros(4), "c": torch.zeros(5), "e": torch.zeros(1)}
    report = compare_keys(expected, got)
    assert not report.ok
    assert report.missing == ["d", "model_ema.a"] and report.unexpected == ["e"]
    assert report.shape_mismatch == [("a", (2, 3), (3, 2))] and report.matched == 2
    summary = report.summary()
    assert "2 missing (d, model_ema.a)" in summary and "1 unexpected (e)" in summary
    assert "a: expected [2, 3], got [3, 2]" in summary and "\n" not in summary
    with pytest.raises(CheckpointKeyError, match="loading X: 2 missing"):
        report.raise_if_bad("loading X")
    ignored = compare_keys(expected, {**got, "model_ema.b": torch.zeros(1)}, ignore_prefixes=("model_ema.",))
    assert ignored.missing == ["d"] and sorted(ignored.ignored) == ["model_ema.a", "model_ema.b"]
    fine = compare_keys({"x": (1,)}, {"x": torch.zeros(1)})
    assert fine.ok and fine.summary() == "all 1 keys match"
    fine.raise_if_bad("unused")


def test_summary_limits_names() -> None:
    report = KeyReport(missing=[f"k{i}" for i in range(12)])
    assert report.summary(limit=3) == "12 missing (k0, k1, k2, ... 9 more)"


def test_load_strict_loads_exactly() -> None:
    src, dst = TinyNet(), TinyNet()
    report = load_strict(dst, src.state_dict())
    assert report.ok and report.matched == 5
    for (key, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


def test_load_strict_names_bad_keys_and_leaves_module_untouched() -> None:
    net = TinyNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sd = TinyNet().state_dict()
    del sd["norm.bias"]
    sd["conv.weight"] = torch.zeros(4, 3, 5, 5)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError) as info:
        load_strict(net, sd)
    message = str(info.value)
    assert message.startswith("cannot load state dict into TinyNet:")
    assert "1 missing (norm.bias)" in message and "1 unexpected (extra.weight)" in message
    assert "conv.weight: expected [4, 3, 3, 3], got [4, 3, 5, 5]" in message
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_load_strict_ignores_only_ema_and_position_ids(caplog: pytest.LogCaptureFixture) -> None:
    src, dst = TinyNet(), TinyNet()
    sd = dict(src.state_dict())
    sd["model_ema.conv.weight"] = torch.zeros(1)
    sd["model_ema.decay"] = torch.tensor(0.999)
    sd["text.embeddings.position_ids"] = torch.arange(77)[None]
    with caplog.at_level(logging.INFO, logger="ldm.checkpoint"):
        report = load_strict(dst, sd)
    assert report.ok and len(report.ignored) == 3
    assert "ignoring 3 checkpoint keys" in caplog.text
    torch.testing.assert_close(dst.conv.weight, src.conv.weight, rtol=0, atol=0)
    # Anything else with a similar name is not ignored.
    sd["model_emax.w"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError, match=r"1 unexpected \(model_emax\.w\)"):
        load_strict(dst, sd)


def test_load_strict_position_ids_missing_from_checkpoint_is_fine() -> None:
    # Newer text encoders keep position_ids as a buffer the checkpoint may lack; the module keeps its own values.
    holder = nn.Module()
    holder.embeddings = nn.Module()
    holder.embeddings.register_buffer("position_ids", torch.arange(3))
    holder.embeddings.token = nn.Linear(2, 2)
    source = {k: v for k, v in holder.state_dict().items() if not k.endswith("position_ids")}
    report = load_strict(holder, source)
    assert report.ok and report.ignored == ["embeddings.position_ids"]
    torch.testing.assert_close(holder.embeddings.position_ids, torch.arange(3), rtol=0, atol=0)


def test_filter_prefix() -> None:
    sd = {"control_model.a": torch.zeros(1), "control_model_ema.b": torch.zeros(1), "model.c": torch.zeros(1)}
    assert list(filter_prefix(sd, "control_model")) == ["a"]
    assert list(filter_prefix(sd, "control_model.", strip=False)) == ["control_model.a"]
    assert filter_prefix(sd, "first_stage_model") == {}
    assert filter_prefix(sd, "model")["c"] is sd["model.c"]
