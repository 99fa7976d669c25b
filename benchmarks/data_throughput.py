"""Is the data pipeline fast enough? Pipeline tokens/s vs trainer tokens/s.

Measures, in one process on one local Ray cluster:

* pipeline: tokens/s the training stream delivers through the same path the
  trainers use (``stream_dataset`` -> ``streaming_split`` -> ``iter_torch_batches``)
  to a consumer that does no training;
* tokenize: tokens/s of the Ray Data tokenization stage (actor pool) on raw text;
* trainer: tokens/s a training step consumes for the config's model and batch
  (forward + backward + AdamW, one thread per worker as under Ray Train).

and prints ``pipeline / trainer``: the pipeline must not be the bottleneck
(target >= 5 on a 2-CPU machine).

    python benchmarks/data_throughput.py --config configs/quickstart.yaml
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def measure_pipeline(stream_path: str, micro: int, world: int = 1) -> tuple[float, float, int]:
    """(tokens/s including the executor's start-up, steady-state tokens/s, tokens).

    A segment pays the start-up once (seconds), then streams for its whole
    length: steady state is what must outpace training.
    """
    from raypath.data import stream_dataset

    splits = stream_dataset(stream_path).streaming_split(world, equal=True)
    t0 = time.perf_counter()
    t_first, first, tokens = None, 0, 0
    for batch in splits[0].iter_torch_batches(batch_size=micro, drop_last=True, dtypes=torch.int64):
        n = batch["tokens"][:, :-1].numel()
        if t_first is None:
            t_first, first = time.perf_counter(), n
        tokens += n
    end = time.perf_counter()
    return tokens / (end - t0), (tokens - first) / max(end - t_first, 1e-9), tokens


def measure_tokenize(files, spec, eos: int, out_dir: str) -> float:
    """Tokenize + pack throughput of the actor pool on ``files`` (written to ``out_dir``)."""
    import pyarrow.fs as pafs

    from raypath.data import TokenizeJob, _sum_stats, tokenize_chunks
    from raypath.sources import inspect_files

    chunks = [c for r in inspect_files(list(files), spec.text_column) for c in r["chunks"]]
    t0 = time.perf_counter()
    stats = _sum_stats(tokenize_chunks([TokenizeJob(chunks, 0, out_dir)], pafs.LocalFileSystem(), spec, eos)[0])
    return stats["doc_tokens"] / (time.perf_counter() - t0)


def measure_trainer(cfg, vocab_size: int, eos: int, steps: int = 10) -> float:
    from raypath.model import block_loss, build_model

    torch.set_num_threads(int(cfg.train.cpus_per_worker))  # what a Ray Train worker gets
    model = build_model(cfg.model, vocab_size, eos)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.max_lr)
    x = torch.randint(0, vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1))
    for _ in range(3):
        block_loss(model, x).backward()
        opt.step()
        opt.zero_grad()
    t0 = time.perf_counter()
    for _ in range(steps):
        block_loss(model, x).backward()
        opt.step()
        opt.zero_grad()
    return steps * x[:, :-1].numel() / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--version", default=None, help="version whose stream to read (default: the largest)")
    args = p.parse_args()

    from raypath.cluster import init_ray
    from raypath.config import load_config
    from raypath.run import prepare

    cfg = load_config(args.config, args.set)
    init_ray(cfg.cluster.address, cfg.cluster.num_cpus)
    ctx = prepare(cfg)  # idempotent: reuses a prepared run directory
    version = max(ctx.versions, key=lambda v: v["stream_rows"]) if not args.version else \
        next(v for v in ctx.versions if v["name"] == args.version)
    files = [f["path"] for f in version["train_files"]]

    with_startup, pipeline, n = measure_pipeline(version["stream_path"], cfg.train.micro_batch_size)
    from raypath.data import PrepareSpec

    spec = PrepareSpec(data_dir="", tokenizer_dir=ctx.tokenizer_dir, seq_len=cfg.data.seq_len,
                       text_column=cfg.data.text_column, val_blocks=0, replay_ratio=0.0, seed=0,
                       actors=cfg.data.tokenize_actors, min_blocks=0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenize = measure_tokenize(files, spec, ctx.eos_id, tmp)
    trainer = measure_trainer(cfg, ctx.vocab_size, ctx.eos_id) * cfg.train.num_workers
    result = {"version": version["name"], "stream_tokens": n, "pipeline_tokens_per_s": round(pipeline),
              "pipeline_tokens_per_s_with_startup": round(with_startup),
              "tokenize_tokens_per_s": round(tokenize), "trainer_tokens_per_s": round(trainer),
              "pipeline_over_trainer": round(pipeline / trainer, 2),
              "tokenize_over_trainer": round(tokenize / trainer, 2)}
    print(json.dumps(result, indent=2))
    print(f"pipeline / trainer = {pipeline / trainer:.1f}x steady state, "
          f"{with_startup / trainer:.1f}x with start-up  (target >= 5)")


if __name__ == "__main__":
    main()
