"""Starting the main path from a released model (``model.path``).

``model.path`` is a Hugging Face ``save_pretrained`` directory: a local path
(or a shared filesystem every node sees), or a URI on any pyarrow filesystem
(``s3://``, ``gs://``, ``hdfs://``, ``file://``). A URI is downloaded once into
``RUN_DIR/base_model/`` with a manifest of every file's sha256 written last; a
re-run verifies the copy against the manifest instead of downloading again.

The driver checks the model against the tokenizer before anything trains
(:func:`check_tokenizer`): every token id needs an embedding row, and EOS/PAD
must be real ids. The lineage records the base model's source and the sha256
of its weight files (:func:`describe`), so a release says what it continued.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from raypath.config import ConfigError
from raypath.mirror import CHUNK, RunDir
from raypath.sources import uri_filesystem
from raypath.storage import atomic_dir, atomic_file, in_threads, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

#: Where a ``model.path`` URI is downloaded to, inside the run directory.
BASE_DIR = "base_model"
MANIFEST = "manifest.json"
#: Where a ``save_pretrained`` directory's weights are, in the order ``from_pretrained`` looks:
#: one file, or an index naming a sharded model's files. Anything else next to them
#: (a trainer's ``training_args.bin``, ``optimizer.pt``) is not the model.
WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@dataclass
class BaseModel:
    """A resolved ``model.path``.

    source: ``model.path`` as configured (a directory or a URI).
    local_dir: the directory the model is loaded from (the download for a URI).
    sha256: weight file name (relative) -> sha256.
    """

    source: str
    local_dir: str
    sha256: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict:
        """The lineage's ``model.base`` record."""
        return {"path": self.source, "local_dir": self.local_dir, "weights_sha256": self.sha256}


def _is_uri(path: str) -> bool:
    return "://" in path


def resolve(path: str, rd: RunDir, endpoint: str | None = None) -> BaseModel:
    """The local directory of ``model.path``, downloading a URI into the run directory ``rd`` the first time.

    endpoint: an S3-compatible endpoint (``cluster.storage_endpoint``) for an ``s3://`` path.
    """
    if not _is_uri(path):
        d = Path(path).expanduser().resolve()
        if not (d / "config.json").is_file():
            raise ConfigError(f"model.path: {path!r} is not a save_pretrained directory (no config.json)")
        # Recorded absolute: the lineage reads a "./x" string as relative to the run directory.
        return BaseModel(str(d), str(d), _weight_hashes(d))
    target = rd / BASE_DIR
    manifest = target / MANIFEST
    if manifest.is_file():
        recorded = read_json(manifest)
        if recorded.get("source") != path:
            raise ConfigError(f"model.path: this run started from {recorded.get('source')!r}, now {path!r}; "
                              f"use a new run_dir to start from another model")
        _verify_download(target, recorded["sha256"])
    else:
        _download(path, target, endpoint)
    rd.publish(target)  # workers on other nodes fetch it from the remote run directory
    hashes = read_json(manifest)["sha256"]
    weights = {f.relative_to(target).as_posix() for f in weight_files(target)}
    return BaseModel(path, str(target), {n: h for n, h in hashes.items() if n in weights})


def _download(uri: str, target: Path, endpoint: str | None) -> None:
    try:
        fs, root = uri_filesystem(uri, endpoint)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: cannot list {uri!r} ({e})") from None
    files = {i.path[len(root.rstrip('/')) + 1:]: i.path for i in infos if i.type == pafs.FileType.File}
    if "config.json" not in files:
        raise ConfigError(f"model.path: {uri!r} is not a save_pretrained directory (no config.json)")
    log.info("downloading base model %s (%d files) -> %s", uri, len(files), target)
    # Cost grows with the model: one streaming copy per file, hashed as it lands, several
    # files at a time (a bucket serves each stream at a fraction of the node's bandwidth).
    with atomic_dir(target) as tmp:
        rels = sorted(files)
        digests = in_threads(lambda rel: _copy_hashed(fs, files[rel], tmp / rel), rels)
        write_json(tmp / MANIFEST, {"source": uri, "sha256": dict(zip(rels, digests))})  # last: marks it complete


def _copy_hashed(fs: pafs.FileSystem, src: str, dst: Path) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(src) as f, atomic_file(dst) as out:
        while block := f.read(CHUNK):
            h.update(block)
            out.write(block)
    return h.hexdigest()


def _verify_download(target: Path, hashes: dict[str, str]) -> None:
    """Read in full at every run start (cost grows with the model), a file per core."""
    rels = sorted(hashes)
    actual = in_threads(lambda rel: sha256_file(target / rel) if (target / rel).is_file() else None, rels)
    for rel, digest in zip(rels, actual):
        if digest != hashes[rel]:
            raise ConfigError(f"model.path: the downloaded copy {target / rel} is missing or does not match its "
                              f"sha256; delete {target} to download it again")


def _weight_hashes(d: Path) -> dict[str, str]:
    """sha256 of the weight files: read in full at every run start (cost grows with the model),
    a file per core."""
    files = weight_files(d)
    return {f.relative_to(d).as_posix(): h for f, h in zip(files, in_threads(sha256_file, files))}


def weight_files(directory: str | Path) -> list[Path]:
    """The files of a ``save_pretrained`` directory that hold the model's weights, found as
    ``from_pretrained`` finds them (:data:`WEIGHT_NAMES`); [] when it has none."""
    d = Path(directory)
    name = next((n for n in WEIGHT_NAMES if (d / n).is_file()), None)
    if name is None:
        return []
    if not name.endswith(".index.json"):
        return [d / name]
    return [d / rel for rel in sorted(set(_weight_map(d / name).values()))]


def _weight_map(index: Path) -> dict[str, str]:
    """An index's ``weight_map``: tensor name -> the file holding it."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, AttributeError):  # not JSON, or JSON but not a mapping
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ConfigError(f"model.path: {index} needs \"weight_map\": {{tensor name: file name}} "
                          f"(the index save_pretrained writes for a sharded model)")
    return weight_map


def check_tokenizer(model_dir: str, tok, tokenizer_field: str, seq_len: int | None = None) -> None:
    """Fail before training unless the model's embedding covers ``tok`` and its EOS/PAD ids exist.

    tokenizer_field: the config field the tokenizer came from, named in the error.
    """
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    rows = cfg.vocab_size
    if len(tok) > rows:
        raise ConfigError(f"{tokenizer_field}: the tokenizer has {len(tok)} tokens but model.path's embedding has "
                          f"only {rows} rows")
    if tok.eos_token_id is None:
        raise ConfigError(f"{tokenizer_field}: the tokenizer defines no EOS token (documents are packed EOS-separated)")
    for name, tid in (("EOS", tok.eos_token_id), ("PAD", tok.pad_token_id)):
        if tid is not None and not 0 <= tid < rows:
            raise ConfigError(f"{tokenizer_field}: {name} id {tid} is outside model.path's embedding ({rows} rows)")
    limit = getattr(cfg, "max_position_embeddings", None)
    if seq_len and limit and seq_len > limit:
        raise ConfigError(f"data.seq_len: {seq_len} exceeds model.path's max_position_embeddings {limit}")
