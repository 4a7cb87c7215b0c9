"""Provenance: a manifest of the artifact, a pickle scan, and an OpenSSF model-signing signature.

Public surface::

    build_manifest(*, artifact_dir_or_file, artifact, hardware, subject_info, checks) -> dict
    scan_pickle(path) -> list[str]              files that hold pickled data (relative paths)
    provenance_check(*, artifact, hardware, out_dir, key_dir, subject_info, checks=()) -> CheckResult
    verify(path, *, public_key=None) -> dict    raises ModelError naming the first thing that changed

A signed bundle (``out_dir`` of ``provenance_check``; the whole folder is the signed "model")::

    <out_dir>/
      artifact/          a copy of the artifact: the files of a folder artifact, or the one model file
      manifest.json      build_manifest(...): every artifact file's sha256 and size (paths relative to
                         artifact/), tool versions, hardware fingerprint, model name/version, check verdicts
      model.sig          the signature: a Sigstore bundle (DSSE envelope, in-toto statement listing the
                         sha256 of artifact/* and manifest.json), signed with an EC P-256 key
      public_key.pem     the public half of that key (PEM, SubjectPublicKeyInfo)

``model.sig`` and ``public_key.pem`` are outside the signed set (model-signing's ignore paths, recorded in
the signed statement; so are ``.git*`` entries at the top, which its verifier always skips); any other file
added, removed or changed makes verification fail, and ``verify`` names the first one. The folder must
hold nothing else when it is signed (``ConfigError`` otherwise).

The signing key is ``<key_dir>/signing_key.pem`` (EC P-256, PKCS#8, unencrypted, mode 0600, created on
first use; a key file that group or others can read is refused), with ``<key_dir>/public_key.pem`` beside
it. Key material is never logged; the public key's sha256 is.

Pickle is refused anywhere in the artifact: loading it can run code. ``scan_pickle`` flags files by
extension (``.pkl .pickle .joblib .pt .pth .ckpt``), by content (a pickle protocol 2-5 header
``\\x80\\x02``..``\\x80\\x05``; a zip, e.g. a torch checkpoint, with a ``.pkl`` member or a member starting
with that header) and NumPy files that need ``allow_pickle`` (``.npy``, or ``.npz`` members, with an
object dtype). A ``.bin`` is flagged by content only (OpenVINO IR weights are ``.bin``; PyTorch's
``pytorch_model.bin`` is a pickle or a torch zip and is caught by its content). Protocol 0/1 pickles
have no header and are only caught by extension.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import stat
import time
import zipfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from edgeopt.certify.records import CheckResult
from edgeopt.data import file_sha256, path_sha256
from edgeopt.errors import ConfigError, ModelError
from edgeopt.records import Artifact, HardwareFingerprint

__all__ = ["ARTIFACT_DIR", "MANIFEST", "PICKLE_EXTENSIONS", "PUBLIC_KEY", "SIGNATURE", "SIGNING_KEY",
           "build_manifest", "provenance_check", "scan_pickle", "verify"]

log = logging.getLogger(__name__)

ARTIFACT_DIR, MANIFEST, SIGNATURE, PUBLIC_KEY = "artifact", "manifest.json", "model.sig", "public_key.pem"
SIGNING_KEY = "signing_key.pem"
MANIFEST_SCHEMA = "edgeopt.provenance/1"
PICKLE_EXTENSIONS = frozenset({".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt"})
_PICKLE_HEADERS = tuple(bytes([0x80, p]) for p in (2, 3, 4, 5))
_UNSIGNED = (SIGNATURE, PUBLIC_KEY)
#: left out of the signed set by model-signing's verifier whatever the signature says
_GIT_PATHS = (".git", ".gitattributes", ".github", ".gitignore")


# ------------------------------------------------------------------------------------ manifest
def _files(root: Path) -> list[Path]:
    return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())


def build_manifest(*, artifact_dir_or_file: Path, artifact: Artifact, hardware: HardwareFingerprint,
                   subject_info: dict[str, Any], checks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of the artifact at ``artifact_dir_or_file`` (see the module docstring); JSON-able."""
    root = Path(artifact_dir_or_file)
    if not root.exists():
        raise ModelError(f"artifact {root} does not exist")
    base = root.parent if root.is_file() else root
    files = [{"path": f.relative_to(base).as_posix(), "sha256": file_sha256(f),
              "size_bytes": f.stat().st_size} for f in _files(root)]
    verdicts = []
    for c in checks:
        if "check" not in c or "status" not in c:
            raise ConfigError(f"a check verdict needs 'check' and 'status' (got keys: "
                              f"{', '.join(sorted(c))})")
        verdicts.append({k: c.get(k) for k in ("check", "status", "summary", "reason")})
    tree = path_sha256(root)
    return {
        "schema": MANIFEST_SCHEMA,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"name": subject_info.get("model_name", subject_info.get("name")),
                  "version": subject_info.get("version")},
        "subject": subject_info,
        "artifact": {"candidate": artifact.candidate, "backend": artifact.backend,
                     "precision": artifact.precision,
                     "layout": "file" if root.is_file() else "folder", "sha256": tree,
                     "recorded_sha256": artifact.sha256, "recorded_sha256_matches": tree == artifact.sha256,
                     "parent_sha256": artifact.parent_sha256, "runtime": artifact.runtime,
                     "size_bytes": sum(f["size_bytes"] for f in files), "files": files},
        "tool_versions": {"artifact": dict(artifact.tool_versions), "host": dict(hardware.tool_versions)},
        "hardware": hardware.model_dump(mode="json"),
        "checks": verdicts,
        "checks_failed": [v["check"] for v in verdicts if v["status"] == "fail"],
    }


# --------------------------------------------------------------------------------- pickle scan
def _pickle_reason(path: Path) -> str | None:
    """Why ``path`` holds pickled data, or None."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_EXTENSIONS:
        return f"extension {suffix}"
    with open(path, "rb") as fh:
        head = fh.read(8)
        if head.startswith(_PICKLE_HEADERS):
            return f"pickle protocol {head[1]} header"
        if head.startswith(b"\x93NUMPY"):
            fh.seek(0)
            return "NumPy object array (needs allow_pickle)" if _npy_object(fh) else None
    if head.startswith(b"PK") and zipfile.is_zipfile(path):
        return _zip_reason(path)
    return None


def _npy_object(fh: IO[bytes]) -> bool:
    """A .npy stream whose dtype holds Python objects (an unreadable header counts as one: not trusted)."""
    import numpy as np

    try:
        version = np.lib.format.read_magic(fh)
        fmt = np.lib.format
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        return bool(reader(fh)[2].hasobject)
    except (ValueError, OSError, SyntaxError, TypeError, KeyError):
        return True


def _zip_reason(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                if info.filename.lower().endswith((".pkl", ".pickle")):
                    return f"zip member {info.filename}"
                with zf.open(info) as member:
                    head = member.read(8)
                if head.startswith(_PICKLE_HEADERS):
                    return f"zip member {info.filename} is a pickle"
                if head.startswith(b"\x93NUMPY"):
                    with zf.open(info) as member:
                        if _npy_object(member):
                            return f"zip member {info.filename}: NumPy object array (needs allow_pickle)"
    except (zipfile.BadZipFile, OSError, RuntimeError) as exc:  # RuntimeError: encrypted members
        return f"unreadable zip ({type(exc).__name__}: {exc})"
    return None


def _scan(path: Path) -> dict[str, str]:
    root = Path(path)
    base = root.parent if root.is_file() else root
    found = {}
    for f in _files(root):
        reason = _pickle_reason(f)
        if reason:
            found[f.relative_to(base).as_posix()] = reason
    return found


def scan_pickle(path: Path) -> list[str]:
    """Files under ``path`` (or ``path`` itself) that hold pickled data, as paths relative to the folder
    (the file's name for a file); see the module docstring for what is flagged."""
    return list(_scan(Path(path)))


# ------------------------------------------------------------------------------------- signing
def _signing_key(key_dir: Path) -> tuple[Path, Path]:
    """(private key path, public key path) in ``key_dir``; the key is created on first use."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    private, public = key_dir / SIGNING_KEY, key_dir / PUBLIC_KEY
    if not private.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        try:
            fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # created meanwhile by another process: use that one
            pass
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
            log.info("created an EC P-256 signing key in %s", private)
        del key, pem
    mode = stat.S_IMODE(private.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"signing key {private} is readable by others (mode {mode:o}); chmod 600 it")
    key = serialization.load_pem_private_key(private.read_bytes(), password=None)
    pem_public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    if not public.is_file() or public.read_bytes() != pem_public:
        public.write_bytes(pem_public)
    return private, public


def _key_sha256(public_key: Path) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_key.read_bytes())
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _sign(bundle: Path, *, private_key: Path) -> None:
    import model_signing

    # git files are left out as the verifier always does; manifest.json still lists their digests
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=list(_UNSIGNED), ignore_git_paths=True)
    (model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key)
     .set_hashing_config(hashing).sign(bundle, bundle / SIGNATURE))


def provenance_check(*, artifact: Artifact, hardware: HardwareFingerprint, out_dir: Path, key_dir: Path,
                     subject_info: dict[str, Any], checks: Sequence[dict[str, Any]] = ()) -> CheckResult:
    """Copy the artifact into a bundle, write its manifest, sign the bundle and verify it (check
    ``provenance``). Fails on pickle in the artifact, a missing artifact, or a signing/verification error."""
    started = time.monotonic()
    source, out_dir = Path(artifact.path), Path(out_dir).resolve()

    def result(status: str, summary: str, reason: str | None = None, files: tuple[str, ...] = (),
               evidence: dict[str, Any] | None = None) -> CheckResult:
        return CheckResult(check="provenance", status=status, summary=summary, reason=reason, files=files,
                           evidence=evidence or {}, duration_s=time.monotonic() - started)

    if not source.exists():
        return result("fail", "artifact missing", f"artifact {source} does not exist")
    found = _scan(source)
    if found:
        listed = ", ".join(f"{k} ({v})" for k, v in found.items())
        log.warning("provenance of %s: pickle found: %s", artifact.candidate, listed)
        return result("fail", f"{len(found)} file(s) hold pickled data; nothing signed",
                      f"pickle found (loading it can run code): {listed}", evidence={"pickle": found})
    _clear(out_dir)
    target = out_dir / ARTIFACT_DIR
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        target.mkdir()
        shutil.copy2(source, target / source.name)
    manifest = build_manifest(artifact_dir_or_file=target if source.is_dir() else target / source.name,
                              artifact=artifact, hardware=hardware, subject_info=subject_info, checks=checks)
    manifest["pickle_scan"] = {"files_scanned": len(manifest["artifact"]["files"]), "found": []}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    files = tuple(str(out_dir / n) for n in (ARTIFACT_DIR, MANIFEST, SIGNATURE, PUBLIC_KEY))
    try:
        private, public = _signing_key(Path(key_dir))
        _sign(out_dir, private_key=private)
        shutil.copyfile(public, out_dir / PUBLIC_KEY)
        checked = verify(out_dir)
    except Exception as exc:  # noqa: BLE001 - a key, signing or verification error fails the check
        message = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        log.warning("provenance of %s: signing failed: %s", artifact.candidate, message)
        return result("fail", "signing failed", f"signing failed: {message}",
                      files=tuple(f for f in files if Path(f).exists()))
    evidence = {"bundle": str(out_dir), "manifest_sha256": file_sha256(out_dir / MANIFEST),
                "artifact_sha256": manifest["artifact"]["sha256"],
                "recorded_sha256_matches": manifest["artifact"]["recorded_sha256_matches"],
                "artifact_files": len(manifest["artifact"]["files"]),
                "size_bytes": manifest["artifact"]["size_bytes"],
                "public_key_sha256": checked["public_key_sha256"], "signing": "model-signing, EC P-256 key",
                "pickle": {}}
    summary = (f"signed {evidence['artifact_files']} artifact file(s) ({evidence['size_bytes']} bytes) and "
               f"the manifest with EC P-256 key {evidence['public_key_sha256'][:16]}; no pickle; signature "
               "verified")
    log.info("provenance of %s: %s", artifact.candidate, summary)
    return result("pass", summary, files=files, evidence=evidence)


def _clear(out_dir: Path) -> None:
    """Make ``out_dir`` an empty bundle folder (a previous bundle's entries are replaced)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = {ARTIFACT_DIR, MANIFEST, SIGNATURE, PUBLIC_KEY}
    other = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
    if other:
        raise ConfigError(f"provenance bundle folder {out_dir} must hold only the bundle; found: "
                          f"{', '.join(other)}")
    shutil.rmtree(out_dir / ARTIFACT_DIR, ignore_errors=True)
    for name in (MANIFEST, SIGNATURE, PUBLIC_KEY):
        (out_dir / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ verifying
def verify(path: Path, *, public_key: Path | None = None) -> dict[str, Any]:
    """Check the bundle at ``path``: its signature with ``public_key`` (default: the one beside it), then
    every digest of ``manifest.json`` against the files. Raises ``ModelError`` (one line) on the first
    problem; returns a summary on success.

    The key beside the bundle proves only that nothing changed since someone signed it (a forger can
    replace both): pass the public key you trust as ``public_key`` to prove who signed it."""
    import model_signing

    bundle = Path(path).resolve()
    key = Path(public_key) if public_key is not None else bundle / PUBLIC_KEY
    for needed in (bundle / SIGNATURE, bundle / MANIFEST, key):
        if not needed.is_file():
            raise ModelError(f"signed bundle {bundle}: {needed} is missing")
    try:
        config = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=key)
        config.verify(bundle, bundle / SIGNATURE)
    except ValueError as exc:
        if "Key mismatch" in str(exc):
            raise ModelError(f"signed bundle {bundle}: the signature was not made with the key of {key} "
                             "(key mismatch)") from exc
        raise ModelError(f"signed bundle {bundle}: {_first_difference(bundle, str(exc))}") from exc
    except Exception as exc:  # a forged or malformed signature, an unreadable key: refused, in one line
        if type(exc).__name__ == "InvalidSignature":
            raise ModelError(f"signed bundle {bundle}: {SIGNATURE} does not verify with the public key {key} "
                             "(signature altered or made with another key)") from exc
        raise ModelError(f"signed bundle {bundle}: signature or key unreadable ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]})") from exc
    manifest = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    root = bundle / ARTIFACT_DIR
    listed = {f["path"]: f for f in manifest["artifact"]["files"]}
    present = {p.relative_to(root).as_posix() for p in _files(root)} if root.is_dir() else set()
    for rel in sorted(set(listed) | present):
        if rel not in listed or rel not in present:
            raise ModelError(f"signed bundle {bundle}: {ARTIFACT_DIR}/{rel} is "
                             f"{'not in the manifest' if rel not in listed else 'missing'}")
        if file_sha256(root / rel) != listed[rel]["sha256"]:
            raise ModelError(f"signed bundle {bundle}: {ARTIFACT_DIR}/{rel} changed (sha256 differs from the "
                             "manifest)")
    return {"bundle": str(bundle), "files": len(listed), "artifact_sha256": manifest["artifact"]["sha256"],
            "model": manifest["model"], "checks": manifest["checks"], "created_utc": manifest["created_utc"],
            "manifest_sha256": file_sha256(bundle / MANIFEST), "public_key_sha256": _key_sha256(key)}


def _first_difference(bundle: Path, message: str) -> str:
    """The first file that differs from the signed statement, as one line.

    Called once model-signing has checked the signature itself and found that the files' digests differ:
    the statement in ``model.sig`` (in-toto, predicate ``resources``: name, sha256) is then authentic.
    """
    try:
        envelope = json.loads((bundle / SIGNATURE).read_text(encoding="utf-8"))["dsseEnvelope"]
        predicate = json.loads(base64.b64decode(envelope["payload"]))["predicate"]
        if any(r["algorithm"] != "sha256" for r in predicate["resources"]):
            raise ValueError("not sha256")
        signed = {r["name"]: r["digest"] for r in predicate["resources"]}
        ignored = {*predicate["serialization"].get("ignore_paths", ()), *_GIT_PATHS}
    except (OSError, ValueError, KeyError, TypeError):
        return f"signature verification failed: {' '.join(message.split())[:300]}"
    present = {p.relative_to(bundle).as_posix(): p for p in _files(bundle)}
    present = {k: p for k, p in present.items() if not any(k == i or k.startswith(f"{i}/") for i in ignored)}
    for name in sorted(set(signed) | set(present)):
        if name not in present:
            return f"{name} was removed after signing"
        if name not in signed:
            return f"{name} was added after signing"
        if file_sha256(present[name]) != signed[name]:
            return f"{name} changed since signing (sha256 differs from the signed one)"
    return f"signature verification failed: {' '.join(message.split())[:300]}"
