"""Option 2: attention logits gathered straight from the count tables (no W_Q/W_K): the ceiling.

``score[i, j] = log max(P^{n,s}[g_i, t_j], 1e-9)`` for each head's own (n, s) table;
queries whose n-gram was never counted get a uniform row. Also measures what it costs:
the bytes of the tables against W_Q/W_K, and the time to build the logits per batch
against the derived weights' q k^T (warmed up, median of repeats).

    python examples/option2_direct_attention.py [--corpus PATH] [--preset small|seed] [--out DIR]
"""

from __future__ import annotations

from _common import guarded, parser, report_before_after, setup

from jaxattn.options import run_option


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--floor", type=float, default=1e-9, help="probability floor inside the log (default 1e-9)")
    ex = setup(__doc__, arg_parser=p)
    after = guarded(
        lambda: run_option(ex.prep, "2", progress=not ex.args.no_progress, timer=ex.timer, floor=ex.args.floor)
    )
    c = after.extra["cost"]
    print("cost of the gathered logits against the derived W_Q/W_K:")
    print(
        f"  tables: {c['table_bytes_dense'] / 2**20:.2f} MiB dense "
        f"({c['table_bytes_sparse_coo'] / 2**20:.2f} MiB as COO, nnz {c['table_nnz']:,})"
    )
    print(
        f"  W_Q+W_K: {c['wq_wk_bytes'] / 2**20:.2f} MiB for all heads "
        f"({c['wq_wk_bytes_distinct_tables'] / 2**20:.2f} MiB distinct)"
    )
    print(
        f"  per batch {c['batch']}: context lookup {c['context_lookup_s'] * 1e3:.2f} ms "
        f"+ gather {c['gather_s'] * 1e3:.2f} ms"
        f" vs q k^T {c['qk_scores_s'] * 1e3:.2f} ms  (ratio {c['gather_total_over_qk']:.2f})"
    )
    report_before_after(ex, after, title="Option 2: logits gathered from the count tables (before: seed derivation)")


if __name__ == "__main__":
    main()
