"""What a pass over the weights reads, cut into bounded blocks: each block a run of pieces (element ranges of
one tensor each) and the ranged reads that feed them, adjacent ranges coalesced into one request.

A pass names what it walks as `Visit`s, grouped (the graft's groups are its output shards, each block of a
shard's first one carrying the shard's header); a statistics pass or an inspection walks the same tensors
reading other roles, and writes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.engine.planning.options import finetuned_role
from worker.engine.planning.plan import OutputTensor, Plan, Segment
from worker.engine.storage.safetensors_format import build_header, itemsize

COALESCE_GAP = 256 << 10  # read through gaps this small rather than issue another request
_ROLES_FOR_OP = {"transfer": ("target_base", "source_base", "source_finetuned"), "target": ("target_base",),
                 "finetuned": ("source_finetuned",)}


@dataclass
class Visit:
    """One tensor as a pass walks it: the segments it visits, what each piece reads (`roles`; None: what the
    graft's op of the segment reads), the dtype a block counts per element (`unit`; None: the tensor's own)
    and `rows`: pieces cut at whole rows of that many elements (0: anywhere)."""

    tensor: OutputTensor
    segments: list[Segment]
    roles: tuple[str, ...] | None = None
    unit: str | None = None
    rows: int = 0


@dataclass
class Piece:
    tensor: OutputTensor
    op: str
    start: int  # element range of the output tensor
    stop: int
    out_offset: int  # byte offset in the block's output buffer
    reads: dict[str, tuple[int, int]] = field(default_factory=dict)  # role -> (read index, byte offset)
    last: bool = False  # the tensor's final piece in this pass


@dataclass
class Block:
    shard: int  # the group's index
    pieces: list[Piece]
    out_bytes: int
    reads: list[tuple[str, str, int, int]] = field(default_factory=list)  # (role, file, start, length)
    header: bytes | None = None  # set on a shard's first block
    closes_shard: bool = False


def graft_roles(tensor: OutputTensor, op: str) -> tuple[str, ...]:
    """What a graft's segment op reads."""
    if op == "target" and tensor.check_sources_equal:
        return ("target_base", "source_base", "source_finetuned")
    if op == "merge":  # a recipe's segment: every input it names (a diff artifact's stored rows are not one)
        return tuple(r for r in tensor.sources if not _stored_rows(tensor.sources, r))
    if op.startswith("finetuned."):  # a recipe's extra vocabulary rows, from one diff's fine-tune
        return (finetuned_role(int(op.partition(".")[2])),)
    return _ROLES_FOR_OP[op]


def _stored_rows(sources: dict, role: str) -> bool:
    """Whether `role` is a diff artifact's stored fine-tune rows (read by a `finetuned.<i>` segment alone)."""
    if not role.startswith("source_finetuned."):
        return False
    return "delta." + role.partition(".")[2] in sources


def graft_groups(plan: Plan, rows: dict[str, int] | None = None) -> list[tuple[bytes | None, list[Visit]]]:
    """The graft's output: one group per shard, headed by the shard's safetensors header; `rows`: tensors
    whose pieces must hold whole rows (name -> row length)."""
    rows = rows or {}
    return [(build_header([(t.name, t.dtype, t.shape) for t in shard.tensors], {"format": "pt"})[0],
             [Visit(t, t.segments, rows=rows.get(t.name, 0)) for t in shard.tensors]) for shard in plan.shards]


def _coalesce(block: Block, wanted: list[tuple[Piece, str, str, int, int]], canon: dict[str, str] | None = None
              ) -> None:
    """Group the pieces' reads into as few ranged requests as the gaps allow. Roles naming the same model
    (`canon`: role -> the role whose store is read) share their requests."""
    by_file: dict[tuple[str, str], list] = {}
    for item in wanted:
        by_file.setdefault(((canon or {}).get(item[1], item[1]), item[2]), []).append(item)
    for (role, file), items in by_file.items():
        items.sort(key=lambda it: it[3])
        runs: list[list] = []  # [start, end, members]
        for item in items:
            start, length = item[3], item[4]
            if runs and start - runs[-1][1] <= COALESCE_GAP:
                runs[-1][1] = max(runs[-1][1], start + length)
                runs[-1][2].append(item)
            else:
                runs.append([start, start + length, [item]])
        for run_start, run_end, members in runs:
            idx = len(block.reads)
            block.reads.append((role, file, run_start, run_end - run_start))
            for piece, r, _f, start, _n in members:
                piece.reads[r] = (idx, start - run_start)


def _step(visit: Visit, block_bytes: int) -> int:
    """Elements per piece: a block's worth of the widest input (or of the unit counted), whole rows if asked."""
    tensor = visit.tensor
    sources = tensor.sources.values() if visit.roles is None else [tensor.sources[r] for r in visit.roles]
    widest = max([itemsize(visit.unit or tensor.dtype)] + [itemsize(i.dtype) for i in sources])
    step = max(1, block_bytes // widest)
    if visit.rows:
        step = max(visit.rows, step - step % visit.rows)
    return step


class _Builder:
    """Blocks of one group, filled piece by piece."""

    def __init__(self, blocks: list[Block], index: int, header: bytes | None, block_bytes: int,
                 canon: dict[str, str] | None) -> None:
        self.blocks, self.index, self.header, self.block_bytes, self.canon = blocks, index, header, block_bytes, canon
        self.current: Block | None = None
        self.wanted: list = []
        self.first = True

    def close(self) -> None:
        if self.current is not None:
            _coalesce(self.current, self.wanted, self.canon)
            self.blocks.append(self.current)
        self.current, self.wanted = None, []

    def piece(self, visit: Visit, seg: Segment, start: int, stop: int, last: bool) -> None:
        tensor = visit.tensor
        nbytes = (stop - start) * itemsize(visit.unit or tensor.dtype)
        if self.current is not None and self.current.out_bytes + nbytes > self.block_bytes:
            self.close()
        if self.current is None:
            self.current = Block(self.index, [], 0, header=self.header if self.first else None)
            self.first = False
        piece = Piece(tensor, seg.op, start, stop, self.current.out_bytes, last=last)
        self.current.pieces.append(piece)
        self.current.out_bytes += nbytes
        for role in visit.roles or graft_roles(tensor, seg.op):
            info = tensor.sources[role]
            size = itemsize(info.dtype)
            self.wanted.append((piece, role, info.file, info.start + start * size, (stop - start) * size))


def build_blocks(groups: list[tuple[bytes | None, list[Visit]]], block_bytes: int,
                 canon: dict[str, str] | None = None) -> list[Block]:
    """The blocks of a pass, in order; each group's last block closes it (a header-only group, a shard of
    empty tensors, still makes one block; a headerless group with nothing to read makes none)."""
    blocks: list[Block] = []
    for index, (header, visits) in enumerate(groups):
        builder = _Builder(blocks, index, header, block_bytes, canon)
        for visit in visits:
            ops = [seg for seg in visit.segments if seg.stop > seg.start]
            step = _step(visit, block_bytes)
            for seg_index, seg in enumerate(ops):  # an empty tensor: listed in the header, no data
                for start in range(seg.start, seg.stop, step):
                    stop = min(seg.stop, start + step)
                    builder.piece(visit, seg, start, stop, seg_index == len(ops) - 1 and stop == seg.stop)
        builder.close()
        if builder.first:
            if header is None:
                continue
            blocks.append(Block(index, [], 0, header=header))
        blocks[-1].closes_shard = True
    return blocks
