"""Provenance: manifest, pickle scan, OpenSSF model-signing with a local EC key, and verification."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgeopt.certify.provenance import build_manifest, provenance_check, scan_pickle, verify
from edgeopt.data import file_sha256, path_sha256
from edgeopt.errors import ConfigError, ModelError
from edgeopt.records import Artifact, HardwareFingerprint

pytest.importorskip("model_signing")

HW = HardwareFingerprint(hostname="test-host", os="linux", arch="x86_64", cpu_model="test-cpu",
                         isa_flags=("avx2",), cores_physical=2, cores_logical=2, ram_mb=1024, python="3.11",
                         tool_versions={"onnx": "1.23.2"})
SUBJECT = {"model_name": "digits-cnn", "version": "7", "profile": "intel-cpu"}
CHECKS = [{"check": "stress", "status": "pass", "summary": "4 callers", "reason": None, "evidence": {"x": 1}},
          {"check": "soak", "status": "fail", "summary": "leak", "reason": "RSS slope 60 MB/min > 5 MB/min"}]


def _artifact(path: Path) -> Artifact:
    return Artifact(candidate="ort-fp32", backend="onnxruntime", path=str(path), sha256=path_sha256(path),
                    size_bytes=1, parent_sha256="0" * 64, precision="fp32", runtime={"intra_op_threads": 1},
                    tool_versions={"onnxruntime": "1.32.0"})


@pytest.fixture
def folder(tiny, tmp_path) -> Path:
    """A folder artifact: the model, a config and a nested file."""
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    shutil.copy(tiny["model"], d / "model.onnx")
    (d / "config.json").write_text('{"labels": 4}')
    (d / "sub" / "notes.txt").write_text("built by edgeopt\n")
    return d


def _flip(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def test_sign_and_verify_a_file_artifact(tiny, tmp_path):
    keys, bundle = tmp_path / "keys", tmp_path / "bundle"
    r = provenance_check(artifact=_artifact(tiny["model"]), hardware=HW, out_dir=bundle, key_dir=keys,
                         subject_info=SUBJECT, checks=CHECKS)
    assert r.check == "provenance" and r.status == "pass", r.reason
    layout = ["artifact", "manifest.json", "model.sig", "public_key.pem"]
    assert sorted(p.name for p in bundle.iterdir()) == layout
    assert (bundle / "artifact" / "tiny.onnx").read_bytes() == tiny["model"].read_bytes()
    assert stat.S_IMODE((keys / "signing_key.pem").stat().st_mode) == 0o600
    assert (keys / "public_key.pem").read_bytes() == (bundle / "public_key.pem").read_bytes()
    assert b"PRIVATE" not in (bundle / "public_key.pem").read_bytes()
    json.dumps(r.evidence, allow_nan=False)

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"] == {"name": "digits-cnn", "version": "7"} and manifest["subject"] == SUBJECT
    assert manifest["artifact"]["files"] == [{"path": "tiny.onnx", "sha256": file_sha256(tiny["model"]),
                                              "size_bytes": tiny["model"].stat().st_size}]
    assert manifest["artifact"]["recorded_sha256_matches"] is True
    assert manifest["tool_versions"] == {"artifact": {"onnxruntime": "1.32.0"}, "host": {"onnx": "1.23.2"}}
    assert manifest["hardware"]["cpu_model"] == "test-cpu" and manifest["created_utc"]
    assert [c["check"] for c in manifest["checks"]] == ["stress", "soak"]
    assert manifest["checks_failed"] == ["soak"]
    assert "evidence" not in manifest["checks"][0]  # verdicts only

    summary = verify(bundle)
    assert summary["files"] == 1 and summary["model"]["version"] == "7"
    assert summary["manifest_sha256"] == r.evidence["manifest_sha256"]
    assert summary["manifest_sha256"] == file_sha256(bundle / "manifest.json")
    assert summary["public_key_sha256"] == r.evidence["public_key_sha256"]
    # the key is made once and reused; signing again into the same folder replaces the bundle
    again = provenance_check(artifact=_artifact(tiny["model"]), hardware=HW, out_dir=bundle, key_dir=keys,
                             subject_info=SUBJECT)
    assert again.status == "pass" and again.evidence["public_key_sha256"] == r.evidence["public_key_sha256"]


def test_verify_names_what_changed(folder, tmp_path):
    bundle = tmp_path / "bundle"
    r = provenance_check(artifact=_artifact(folder), hardware=HW, out_dir=bundle, key_dir=tmp_path / "keys",
                         subject_info=SUBJECT, checks=CHECKS)
    assert r.status == "pass", r.reason
    assert verify(bundle)["files"] == 3

    notes = bundle / "artifact" / "sub" / "notes.txt"
    _flip(notes, 3)
    with pytest.raises(ModelError, match=r"artifact/sub/notes\.txt changed since signing") as err:
        verify(bundle)
    assert "\n" not in str(err.value)
    _flip(notes, 3)
    verify(bundle)

    manifest = bundle / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"version": "7"', '"version": "8"'))
    with pytest.raises(ModelError, match=r"manifest\.json changed since signing"):
        verify(bundle)
    manifest.write_text(text)

    (bundle / "artifact" / "extra.onnx").write_bytes(b"\x00")
    with pytest.raises(ModelError, match=r"artifact/extra\.onnx was added after signing"):
        verify(bundle)
    (bundle / "artifact" / "extra.onnx").unlink()
    (bundle / "artifact" / "config.json").unlink()
    with pytest.raises(ModelError, match=r"artifact/config\.json was removed after signing"):
        verify(bundle)


def test_verify_refuses_another_key_and_a_forged_signature(tiny, tmp_path):
    bundle, other = tmp_path / "bundle", tmp_path / "other"
    for out, keys in ((bundle, tmp_path / "keys"), (other, tmp_path / "other-keys")):
        r = provenance_check(artifact=_artifact(tiny["model"]), hardware=HW, out_dir=out, key_dir=keys,
                             subject_info=SUBJECT)
        assert r.status == "pass", r.reason
    with pytest.raises(ModelError, match="key mismatch"):
        verify(bundle, public_key=tmp_path / "other-keys" / "public_key.pem")
    # the other bundle's signature (another key) put in place of this one, with its key: verifies only
    # against that key, not against the trusted one
    shutil.copy(other / "model.sig", bundle / "model.sig")
    shutil.copy(other / "public_key.pem", bundle / "public_key.pem")
    verify(bundle)
    with pytest.raises(ModelError, match="key mismatch"):
        verify(bundle, public_key=tmp_path / "keys" / "public_key.pem")
    # a signature whose bytes were altered
    sig = json.loads((other / "model.sig").read_text())
    envelope = sig["dsseEnvelope"]
    tail = "A" * 8 if envelope["payload"][-8:] != "A" * 8 else "B" * 8
    envelope["payload"] = envelope["payload"][:-8] + tail
    (other / "model.sig").write_text(json.dumps(sig))
    with pytest.raises(ModelError, match=r"model\.sig does not verify with the public key"):
        verify(other)
    (other / "model.sig").unlink()
    with pytest.raises(ModelError, match=r"model\.sig is missing"):
        verify(other)


def test_pickle_in_the_artifact_fails_the_check(folder, tmp_path):
    (folder / "sub" / "tokenizer.pkl").write_bytes(pickle.dumps({"vocab": [1, 2]}))
    bundle = tmp_path / "bundle"
    r = provenance_check(artifact=_artifact(folder), hardware=HW, out_dir=bundle, key_dir=tmp_path / "keys",
                         subject_info=SUBJECT)
    assert r.status == "fail" and "sub/tokenizer.pkl" in r.reason and "pickle" in r.reason
    assert r.evidence["pickle"] == {"sub/tokenizer.pkl": "extension .pkl"}
    assert not (bundle / "model.sig").exists() and not (tmp_path / "keys").exists()


def test_scan_pickle_by_extension_and_content(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "weights.pt").write_bytes(b"anything")  # by extension
    (d / "pytorch_model.bin").write_bytes(pickle.dumps([1, 2, 3], protocol=2))  # content, protocol 2
    (d / "state.dat").write_bytes(pickle.dumps({"a": 1}, protocol=5))  # content, protocol 5
    with zipfile.ZipFile(d / "checkpoint.zip", "w") as zf:  # the layout of torch.save
        zf.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
        zf.writestr("archive/data/0", b"\x00" * 16)
    np.save(d / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.savez(d / "mixed.npz", ok=np.zeros(3), bad=np.array(["x", 1], dtype=object))
    # not pickle: numeric arrays, OpenVINO-style .bin weights, an ONNX file, a zip of plain files
    np.save(d / "numbers.npy", np.arange(5))
    np.savez(d / "numbers.npz", a=np.arange(3), b=np.ones((2, 2), np.float32))
    (d / "model.bin").write_bytes(np.random.default_rng(0).standard_normal(64).astype(np.float32).tobytes())
    (d / "model.xml").write_text("<net/>")
    with zipfile.ZipFile(d / "tokenizer.zip", "w") as zf:
        zf.writestr("vocab.txt", "a\nb\n")
    found = scan_pickle(d)
    assert sorted(found) == ["checkpoint.zip", "mixed.npz", "objects.npy", "pytorch_model.bin", "state.dat",
                             "weights.pt"]
    assert scan_pickle(d / "numbers.npy") == [] and scan_pickle(d / "state.dat") == ["state.dat"]


def test_refusals(tiny, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "signing_key.pem").write_text("not a key")
    os.chmod(keys / "signing_key.pem", 0o644)
    r = provenance_check(artifact=_artifact(tiny["model"]), hardware=HW, out_dir=tmp_path / "b", key_dir=keys,
                         subject_info=SUBJECT)
    assert r.status == "fail" and "readable by others" in r.reason and "not a key" not in r.reason
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "report.html").write_text("x")
    with pytest.raises(ConfigError, match="report.html"):
        provenance_check(artifact=_artifact(tiny["model"]), hardware=HW, out_dir=crowded,
                         key_dir=tmp_path / "k2", subject_info=SUBJECT)
    gone = _artifact(tiny["model"]).model_copy(update={"path": str(tmp_path / "x")})
    missing = provenance_check(artifact=gone, hardware=HW, out_dir=tmp_path / "b2", key_dir=tmp_path / "k3",
                               subject_info=SUBJECT)
    assert missing.status == "fail" and "does not exist" in missing.reason
    with pytest.raises(ConfigError, match="'check' and 'status'"):
        build_manifest(artifact_dir_or_file=tiny["model"], artifact=_artifact(tiny["model"]), hardware=HW,
                       subject_info=SUBJECT, checks=[{"summary": "no verdict"}])
