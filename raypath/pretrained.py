"""Starting the main path from a released model (``model.path``).

``model.path`` is a Hugging Face ``save_pretrained`` directory: a local path
(or a shared filesystem every node sees), or a URI on any pyarrow filesystem
(``s3://``, ``gs://``, ``hdfs://``, ``file://``). A URI is downloaded once into
``RUN_DIR/base_model/`` with a manifest of every file's sha256 written last; a
re-run verifies the copy against the manifest instead of downloading again.

The driver checks the model (:func:`check_model`: its layout and weight files) and the
tokenizer against it (:func:`check_tokenizer`) before anything trains: every token id
needs an embedding row, and EOS/PAD must be real ids. The lineage records the base model's source and the sha256
of its weight files (:func:`describe`), so a release says what it continued.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from raypath.config import ConfigChangedError, ConfigError
from raypath.console import Progress
from raypath.mirror import CHUNK, RunDir
from raypath.sources import uri_filesystem
from raypath.storage import atomic_dir, atomic_file, in_threads, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

#: Where a ``model.path`` URI is downloaded to, inside the run directory (of a local ``model.path``,
#: the copy of its :data:`BASE_CONFIG_FILES` an export reads: :func:`raypath.run.keep_for_export`).
BASE_DIR = "base_model"
#: A base model's files that give its architecture and generation defaults (no weights).
BASE_CONFIG_FILES = ("config.json", "generation_config.json")
MANIFEST = "manifest.json"
#: Where a ``save_pretrained`` directory's weights are, in the order ``from_pretrained`` looks:
#: one file, or an index naming a sharded model's files. Anything else next to them
#: (a trainer's ``training_args.bin``, ``optimizer.pt``) is not the model.
WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
#: Files of other weight formats (Meta's ``consolidated.*.pth``, TF/Flax, GGUF): a download skips
#: those that are not the model's :func:`weight_files`.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


#: What a base model's ``config.json`` says of its shape, recorded in the lineage.
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "rope_theta")


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
        """The lineage's ``model.base`` record, with the architecture its ``config.json`` gives (the
        config's ``model`` shape fields are ignored beside ``model.path``, so they do not say it)."""
        arch = read_json(Path(self.local_dir) / "config.json")
        return {"path": self.source, "local_dir": self.local_dir, "weights_sha256": self.sha256,
                "architecture": {k: arch[k] for k in ARCHITECTURE_KEYS if k in arch}}

    def check_kept(self, recorded: dict | None) -> None:
        """Raise unless the weights are those of ``recorded`` (the lineage's ``model.base``, None when
        it has none): a lineage whose main path started from a base model records which weights it
        continued, and a directory re-saved in place must not rewrite that record."""
        before = (recorded or {}).get("weights_sha256")
        if not before or before == self.sha256:
            return
        name = next(n for n in sorted({*before, *self.sha256}) if before.get(n) != self.sha256.get(n))
        old, new = (f"{h[:12]}..." if h else "absent" for h in (before.get(name), self.sha256.get(name)))
        raise ConfigChangedError(
            f"model.path: {Path(self.local_dir) / name} changed since this lineage's main path started from it "
            f"(sha256 {old} recorded, {new} now); the lineage keeps the base model it continued: restore "
            f"those weights, or set run_dir to a new directory to start another")


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
        # The top level only: from_pretrained reads nothing below it (a hub repo's original/
        # holds a second copy of the weights in another format).
        infos = fs.get_file_info(pafs.FileSelector(root))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: cannot list {uri!r} ({e})") from None
    files = {i.path[len(root.rstrip('/')) + 1:]: i.path for i in infos if i.type == pafs.FileType.File}
    if "config.json" not in files:
        raise ConfigError(f"model.path: {uri!r} is not a save_pretrained directory (no config.json)")
    files = _model_files(fs, files)
    size = {i.path: i.size for i in infos}
    log.info("downloading base model %s (%d files) -> %s", uri, len(files), target)
    progress = Progress(log, f"downloading base model {uri}", sum(size[p] for p in files.values()), "B")
    # Cost grows with the model: one streaming copy per file, hashed as it lands, several
    # files at a time (a bucket serves each stream at a fraction of the node's bandwidth).
    with atomic_dir(target) as tmp:
        rels = sorted(files)
        digests = in_threads(lambda rel: _copy_hashed(fs, files[rel], tmp / rel, progress), rels)
        write_json(tmp / MANIFEST, {"source": uri, "sha256": dict(zip(rels, digests))})  # last: marks it complete


def _model_files(fs: pafs.FileSystem, files: dict[str, str]) -> dict[str, str]:
    """Of a model directory's files (name -> path in ``fs``), those ``from_pretrained`` loads: all
    but the weight files it does not read (:data:`WEIGHT_SUFFIXES`, :func:`weight_files`)."""
    name = next((n for n in WEIGHT_NAMES if n in files), None)
    weights = {name}
    if name is not None and name.endswith(".index.json"):
        with fs.open_input_stream(files[name]) as f:
            weights |= set(_weight_map(f.read().decode(errors="replace"), name).values())
    return {rel: p for rel, p in files.items() if rel in weights or not rel.endswith(WEIGHT_SUFFIXES)}


def _copy_hashed(fs: pafs.FileSystem, src: str, dst: Path, progress: Progress) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(src) as f, atomic_file(dst) as out:
        while block := f.read(CHUNK):
            h.update(block)
            out.write(block)
            progress.add(len(block))
    return h.hexdigest()


def _verify_download(target: Path, hashes: dict[str, str]) -> None:
    """Read in full at every run start (cost grows with the model), a file per core."""
    rels = sorted(hashes)
    present = {rel: target / rel for rel in rels if (target / rel).is_file()}
    total = sum(f.stat().st_size for f in present.values())
    progress = Progress(log, f"verifying the downloaded base model {target}", total, "B")
    actual = in_threads(lambda rel: sha256_file(present[rel], progress=progress) if rel in present else None, rels)
    for rel, digest in zip(rels, actual):
        if digest != hashes[rel]:
            raise ConfigError(f"model.path: the downloaded copy {target / rel} is missing or does not match its "
                              f"sha256; delete {target} to download it again")


def _weight_hashes(d: Path) -> dict[str, str]:
    """sha256 of the weight files: read in full at every run start (cost grows with the model),
    a file per core."""
    files = weight_files(d)
    progress = Progress(log, f"hashing the base model's weights in {d}", sum(f.stat().st_size for f in files), "B")
    hashes = in_threads(lambda f: sha256_file(f, progress=progress), files)
    return {f.relative_to(d).as_posix(): h for f, h in zip(files, hashes)}


def weight_files(directory: str | Path) -> list[Path]:
    """The files of a ``save_pretrained`` directory that hold the model's weights, found as
    ``from_pretrained`` finds them (:data:`WEIGHT_NAMES`); [] when it has none."""
    d = Path(directory)
    name = next((n for n in WEIGHT_NAMES if (d / n).is_file()), None)
    if name is None:
        return []
    if not name.endswith(".index.json"):
        return [d / name]
    return [d / rel for rel in sorted(set(_weight_map((d / name).read_text(), d / name).values()))]


def _weight_map(text: str, index: str | Path) -> dict[str, str]:
    """An index's ``weight_map`` (``text``: the file ``index``): tensor name -> the file holding it."""
    try:
        weight_map = json.loads(text).get("weight_map")
    except (ValueError, AttributeError):  # not JSON, or JSON but not a mapping
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ConfigError(f"model.path: {index} needs \"weight_map\": {{tensor name: file name}} "
                          f"(the index save_pretrained writes for a sharded model)")
    return weight_map


#: Config fields of architectures whose logits are not ``final hidden state @ lm_head.weight``
#: (Gemma 2/3 soft-capping, Granite's and Cohere's scaling, nanochat's softcap). raypath's loss
#: computes exactly that product, chunk by chunk, so it would train and evaluate another function
#: than the model's own forward. Value: what the field holds when the head is plain.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logits_scaling": 1.0, "logit_scale": 1.0, "softcap": None}


def check_tokenizer(model_dir: str | None, tok, tokenizer_field: str, seq_len: int | None = None) -> None:
    """Fail before training unless ``tok`` has an EOS, its EOS/PAD ids are tokens of its own (and
    of the model's embedding, which must cover it), and the model's head is one raypath's loss computes.

    model_dir: ``model.path``'s local directory; None for a fresh model (``data.tokenizer`` alone).
    tokenizer_field: the config field the tokenizer came from, named in the error.
    """
    if tok.eos_token_id is None:
        raise ConfigError(f"{tokenizer_field}: the tokenizer defines no EOS token (documents are packed EOS-separated)")
    rows, where = len(tok), "the tokenizer's vocabulary"
    if model_dir is not None:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        rows, where = cfg.vocab_size, "model.path's embedding"
        if len(tok) > rows:
            raise ConfigError(f"{tokenizer_field}: the tokenizer has {len(tok)} tokens but model.path's embedding has "
                              f"only {rows} rows")
        odd = {k: getattr(cfg, k) for k, plain in LOGIT_TRANSFORMS.items() if getattr(cfg, k, plain) != plain}
        if odd:
            raise ConfigError(f"model.path: a {cfg.model_type} model transforms its logits "
                              f"({', '.join(f'{k}={v}' for k, v in odd.items())}), which raypath's loss does not "
                              f"apply: training and evaluation would follow another function than the model's")
        limit = getattr(cfg, "max_position_embeddings", None)
        if seq_len and limit and seq_len > limit:
            raise ConfigError(f"data.seq_len: {seq_len} exceeds model.path's max_position_embeddings {limit}")
    for name, tid in (("EOS", tok.eos_token_id), ("PAD", tok.pad_token_id)):
        if tid is not None and not 0 <= tid < rows:
            raise ConfigError(f"{tokenizer_field}: {name} id {tid} is outside {where} ({rows} rows)")


def check_model(model_dir: str) -> None:
    """Fail before training unless ``model_dir`` (``model.path``'s local directory) is a model raypath
    trains: a causal LM laid out as ``.model.layers`` and ``.lm_head`` (the Llama family: raypath's
    loss, FSDP sharding and compile reach into those), whose weight files are readable and fit its
    ``config.json``. Otherwise every worker fails inside Ray Train, after the data is prepared.

    Reads the weight files' headers only (safetensors; a ``.bin`` is memory-mapped onto the meta
    device): the cost does not grow with the model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = Path(model_dir)
    try:
        cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with torch.device("meta"):  # the architecture config.json builds, without weights
            model = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError, OSError) as e:  # unknown model_type, not a causal LM, bad JSON
        raise ConfigError(f"model.path: {d / 'config.json'} does not build a causal LM "
                          f"({type(e).__name__}: {str(e).strip().splitlines()[0]})") from None
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        raise ConfigError(f"model.path: {d / 'config.json'}: a {cfg.model_type} model ({type(model).__name__}) is not "
                          f"laid out as .model.layers and .lm_head; raypath trains Llama-family models "
                          f"(llama, mistral, qwen2, qwen3, ...)")
    files = weight_files(d)
    if not files:
        raise ConfigError(f"model.path: {d} holds no weights (expected one of {', '.join(WEIGHT_NAMES)})")
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    for f in files:
        for name, shape in _tensor_shapes(f).items():
            if name in expected and shape != expected[name]:
                raise ConfigError(f"model.path: {f}: tensor {name} has shape {list(shape)}, but {d / 'config.json'} "
                                  f"builds {list(expected[name])}: the weights are another model's")


def _tensor_shapes(f: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of one weight file, from its header (a torn or foreign file is named)."""
    import torch

    try:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                return {k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()}
        state = torch.load(f, mmap=True, weights_only=True, map_location="meta")
        return {k: tuple(t.shape) for k, t in state.items()}
    except Exception as e:  # noqa: BLE001 - safetensors, zip and unpickling errors alike mean a damaged file
        raise ConfigError(f"model.path: {f} is not a readable weight file, torn or damaged "
                          f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
