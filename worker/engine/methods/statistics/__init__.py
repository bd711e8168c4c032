"""Whole-tensor statistics that methods declare (`statistics = (...)` on the method's class) and the pass runner
gathers before the compute pass: one module each.

- magnitude_rank: a diff's window of |delta| ranks (magnitude, breadcrumbs), two reads (radix select);
- l1: a diff's L1 norm before and after its transform (mergekit's `rescale`), one read after the others;
- variance: a tensor's top-k elements by variance across its diffs (sce's `select_topk`), two reads;
- squares: each diff's sum of squares over the tensor, after the variance selection (sce's weights), one read;
- rows: no read, but pieces of whole rows (della's ranks within each row).

Adding one: write its module (a `Statistic` subclass, worker/engine/methods/base.py) and name it in the
`statistics` of the method that needs it.
"""
