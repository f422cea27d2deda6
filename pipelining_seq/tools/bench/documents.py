"""``bench documents``: Seq1F1B attention time per step with and without document masks.

One attention layer runs one micro-batch the way a Seq1F1B stage runs it: the sequence
is cut into ``--chunks`` chunks, forwards in order (each chunk's queries against the
cached K/V of the earlier chunks) and backwards in reverse order. The same q/k/v run
without document ids (plain causal) and with ``--docs`` packed documents of random
lengths per sequence (block-causal), interleaved repeat by repeat; the figure is the
median forward+backward time of the whole sequence. With documents, the blockwise
backend skips cached blocks no query can reach and masks only tiles that straddle a
document boundary, so the time should go down.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ...attention import ChunkedCausalAttention
from ...context import ChunkContext, KVCache, chunk_context
from ...partition import uniform_partition
from .common import env_info, out_dir, print_table, write_results

__all__ = ["add_arguments", "main", "random_documents", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0].replace("``", "")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    parser.add_argument("--chunks", type=int, default=4, help="Seq1F1B chunks k (default 4)")
    parser.add_argument("--docs", type=int, default=16, help="documents per sequence (default 16)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    parser.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=64, help="q/k head size (default 64)")
    parser.add_argument("--v-head-dim", type=int, default=None, help="v head size (default: --head-dim)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="document lengths and data seed (default 0)")
    parser.add_argument("--out", default=None, help="output folder (default $OUT or outputs/bench)")


def random_documents(batch: int, seq_len: int, n_docs: int, *, seed: int) -> torch.Tensor:
    """[batch, seq_len] ids of ``n_docs`` documents per row, boundaries drawn at random."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seq_len - 1, generator=g)[: n_docs - 1] + 1
        starts = torch.zeros(seq_len, dtype=torch.long)
        starts[cuts] = 1
        rows.append(starts.cumsum(0))
    return torch.stack(rows)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(attn: ChunkedCausalAttention, q, k, v, g, lengths: list[int], ids) -> float:
    """Seconds for the forwards (in order) and backwards (reversed) of one micro-batch."""
    cache = KVCache()
    offs = [sum(lengths[:j]) for j in range(len(lengths))]
    _sync(q.device)
    t0 = time.perf_counter()
    outs = []
    for j, n in enumerate(lengths):
        sl = slice(offs[j], offs[j] + n)
        qj, kj, vj = (t[:, :, sl].detach().requires_grad_() for t in (q, k, v))
        kw = {} if ids is None else {"document_ids": ids[:, sl]}
        with chunk_context(ChunkContext(0, j, len(lengths), offs[j], n, cache)):
            outs.append(attn(qj, kj, vj, **kw))
    for j in reversed(range(len(lengths))):
        outs[j].backward(g[:, :, offs[j]:offs[j] + lengths[j]])
    _sync(q.device)
    return time.perf_counter() - t0


def run(*, seq_len: int, chunks: int, docs: int, batch: int, heads: int, kv_heads: int, head_dim: int,
        v_head_dim: int | None, dtype: torch.dtype, device: torch.device, repeats: int, warmup: int,
        seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed + 1)
    dv = v_head_dim or head_dim

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    q, g = rand(batch, heads, seq_len, head_dim), rand(batch, heads, seq_len, dv)
    k, v = rand(batch, kv_heads, seq_len, head_dim), rand(batch, kv_heads, seq_len, dv)
    ids = random_documents(batch, seq_len, docs, seed=seed).to(device)
    lengths = uniform_partition(seq_len, chunks)
    attn = ChunkedCausalAttention()
    variants = {"causal (no documents)": None, f"{docs} documents": ids}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(warmup + repeats):
        for name, var_ids in variants.items():  # interleaved A B A B
            t = time_step(attn, q, k, v, g, lengths, var_ids)
            if rep >= warmup:
                times[name].append(t)
    base = statistics.median(times["causal (no documents)"])
    rows = []
    for name in variants:
        med = statistics.median(times[name])
        rows.append(dict(variant=name, seq_len=seq_len, k=chunks, ms=med * 1e3, min_ms=min(times[name]) * 1e3,
                         vs_causal=med / base, repeats=repeats))
    return rows


def main(args: argparse.Namespace) -> int:
    if args.seq_len % args.chunks:
        raise SystemExit(f"--seq-len {args.seq_len} is not divisible by --chunks {args.chunks}: change one")
    if not 1 <= args.docs <= args.seq_len:
        raise SystemExit(f"--docs {args.docs} must be between 1 and --seq-len {args.seq_len}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = run(seq_len=args.seq_len, chunks=args.chunks, docs=args.docs, batch=args.batch, heads=args.heads,
               kv_heads=args.kv_heads, head_dim=args.head_dim, v_head_dim=args.v_head_dim,
               dtype=getattr(torch, args.dtype), device=device, repeats=args.repeats, warmup=args.warmup,
               seed=args.seed)
    print_table(rows, ["variant", "seq_len", "k", "ms", "min_ms", "vs_causal"],
                formats={"ms": ".1f", "min_ms": ".1f", "vs_causal": ".3f"})
    meta = dict(env=env_info(), args={key: v for key, v in vars(args).items() if not key.startswith("_")})
    jpath, _ = write_results(out_dir(args), "documents", rows, meta, scope="one attention layer, one micro-batch")
    print(f"wrote {jpath}")
    return 0
