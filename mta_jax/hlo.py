"""Reading a compiled XLA module's text: how often each computation runs, the matmul FLOPs of a
step as it runs, and its traffic to HBM apart from what stays on chip.

Two of `compiled.cost_analysis()`'s figures do not mean what a roofline needs:
- It counts every instruction once, including those in a `while` body. XLA's SPMD partitioner
  turns a matmul whose weight is sharded (fsdp) into a *windowed einsum*: a loop whose body
  multiplies the local activations by one shard of the weight while the next shard arrives by
  collective-permute. For T5-small under fsdp=8 on a v5e-8 the cost analysis reported 19%
  fewer FLOPs than for the same step replicated, which does the same matmuls. `Module` finds
  each loop's trip count and each computation's executions per step.
- Its "bytes accessed" are every operand and result of every instruction, in any memory. On a
  TPU most intermediate values live in the on-chip VMEM (memory space 1, `S(1)` in a layout);
  `traffic_bytes(..., space=0)` counts what is read from and written to HBM; of a buffer that
  a fusion passes through untouched or updates in place (`Module.fusion_in_place`), only
  what it writes.
`costs` gathers both, and which products remat recomputes, for `mta_jax.compile`.

Module text (`compiled.as_text()`): computations `%name (params) -> type {` ... `}`, the entry
marked `ENTRY`; an instruction per line, `%name = type opcode(operands), attributes`, operands
named without their types (so a table of every instruction's type is kept).
"""
from __future__ import annotations

import math
import re
from typing import Optional

import numpy as np

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")  # at column 0
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
# dtype, dimensions and layout of each array in an HLO type; the layout's `S(n)` names its memory
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\](\{[^}]*\})?")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
                "c64": 8, "c128": 16}


def _arrays(type_text: str) -> list[tuple[int, int]]:
    """(bytes, memory space) of each array in an HLO type. Space 0 (no `S(n)`) is HBM; on TPUs
    1 is the on-chip vector memory (VMEM) that memory-space assignment moves values into, the
    small ones are scalar and semaphore memories."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(type_text):
        if dtype in _DTYPE_BYTES:
            space = re.search(r"S\((\d+)\)", layout or "")
            out.append((math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dtype],
                        int(space.group(1)) if space else 0))
    return out


def shape_bytes(type_text: str) -> list[int]:
    """'(f32[8,128]{1,0}, bf16[4])' -> [4096, 8]: the bytes of each array in an HLO type."""
    return [nbytes for nbytes, _ in _arrays(type_text)]


class Module:
    """The computations of one HLO module, the type of every instruction in it, and how often
    each computation runs (`runs`, with `fused` and `unknown_trip_counts`: see executions)."""

    def __init__(self, text: str):
        self.computations: dict[str, list[str]] = {}  # name -> its lines
        self._parsed: dict[str, list[tuple[str, str, str, str]]] = {}
        self.entry: Optional[str] = None
        self.types: dict[str, str] = {}
        self.ops: dict[str, tuple[str, str]] = {}  # name -> (opcode, what follows it)
        self._in_place: dict[str, tuple[dict[int, int], set[int]]] = {}
        current = None
        for line in text.splitlines():
            head = _COMPUTATION.match(line) if line[:1] in ("%", "E") else None
            if head:
                current = head.group(2)
                self.computations[current], self._parsed[current] = [], []
                if head.group(1):
                    self.entry = current
                continue
            if line.strip() == "}":
                current = None
                continue
            if current is None:  # a bare list of instructions: one computation, the entry
                if not _INSTRUCTION.match(line):
                    continue
                current = "<top>"
                self.computations.setdefault(current, [])
                self._parsed.setdefault(current, [])
                self.entry = self.entry or current
            self.computations[current].append(line)
            m = _INSTRUCTION.match(line)
            if m:
                self._parsed[current].append(m.groups())
                self.types[m.group(1)] = m.group(2)
                self.ops[m.group(1)] = (m.group(3), m.group(4))
        self.runs = self.executions()

    def instructions(self, computation: str) -> list[tuple[str, str, str, str]]:
        """(name, type, opcode, rest of line) of each instruction of a computation."""
        return self._parsed.get(computation, [])

    def dims(self, name: str) -> list[int]:
        """The dimensions of an instruction's (first) array."""
        arrays = _ARRAY.findall(self.types[name])
        return [int(d) for d in arrays[0][1].split(",") if d] if arrays else []

    def _operands(self, name: str) -> list[str]:
        return re.findall(r"%([\w.\-]+)", self.ops[name][1].split(")")[0])

    def _through_copies(self, name: str) -> str:
        """The instruction a chain of copies starts from (scan copies its counter and start)."""
        while name in self.ops and self.ops[name][0] == "copy":
            name = self._operands(name)[0]
        return name

    def _constant(self, name: str) -> Optional[int]:
        """The integer an instruction holds when it is a scalar constant (or a copy of one)."""
        name = self._through_copies(name)
        if name not in self.ops or self.ops[name][0] != "constant":
            return None
        value = re.match(r"\s*(-?\d+)\)", self.ops[name][1])
        return int(value.group(1)) if value else None

    def _root(self, computation: str) -> Optional[str]:
        for line in self.computations.get(computation, ()):
            if line.lstrip().startswith("ROOT"):
                return _INSTRUCTION.match(line).group(1)
        return None

    def _tuple_index(self, name: str) -> Optional[int]:
        """i when the instruction is get-tuple-element(parameter, index=i) (or a copy of one:
        the gradient-accumulation loop's counter is copied before its increment)."""
        name = self._through_copies(name)
        if name in self.ops and self.ops[name][0] == "get-tuple-element":
            index = re.search(r"index=(\d+)", self.ops[name][1])
            return int(index.group(1)) if index else None
        return None

    def trip_count(self, line: str) -> Optional[int]:
        """Iterations of a `while` instruction (`line`: what follows its opcode): XLA's own
        `known_trip_count` when it wrote one, else read from the loop's form: a condition
        `counter < limit`, the counter's start in the initial tuple and its step in the body's
        `counter + step` (the windowed-einsum loops count 0, 2 < 4 for 8 shards: two
        iterations of four products). None when the loop has another form."""
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        if known:
            return int(known.group(1))
        cond, body = (re.search(rf"{k}=%([\w.\-]+)", line) for k in ("condition", "body"))
        init = re.findall(r"%([\w.\-]+)", line.split(")")[0])
        if not (cond and body and len(init) == 1):
            return None
        compare = self._root(cond.group(1))
        if compare is None or self.ops[compare][0] != "compare" or \
                "direction=LT" not in self.ops[compare][1]:
            return None
        counter, limit = self._operands(compare)
        index, limit = self._tuple_index(counter), self._constant(limit)
        root = self._root(body.group(1))
        if index is None or limit is None or root is None or self.ops[root][0] != "tuple" or \
                self.ops.get(init[0], ("",))[0] != "tuple":
            return None
        start = self._constant(self._operands(init[0])[index])
        update = self._operands(root)[index]
        if start is None or self.ops[update][0] != "add":
            return None
        a, b = self._operands(update)
        step = self._constant(b) if self._tuple_index(a) == index else self._constant(a)
        if not step or step < 0:
            return None
        return max(0, -(-(limit - start) // step))

    def fusion_in_place(self, computation: str, outputs: int) -> tuple[dict[int, int], set[int]]:
        """What a fusion calling `computation` leaves in place: ({output index: the bytes it
        writes there}, {parameters it never reads}). An output that is one of its parameters
        unchanged shares that buffer (0 bytes written); one that is a dynamic-update-slice of
        a parameter writes the update's bytes into it. Such a parameter used by nothing else
        is not read. (XLA's async collective fusions pass the buffers of a windowed einsum's
        gathered weights through every iteration this way.) `outputs`: the arrays of the
        fusion's result; nothing is taken as in place when they are not one per element."""
        if computation in self._in_place:
            return self._in_place[computation]
        root, body = self._root(computation), self.instructions(computation)
        elements = self._operands(root) if root and self.ops[root][0] == "tuple" else [root]
        if len(elements) != outputs:
            self._in_place[computation] = ({}, set())
            return self._in_place[computation]
        written, params = {}, {}
        for i, element in enumerate(elements):
            opcode = self.ops.get(element, ("",))[0]
            if opcode == "parameter":
                written[i], params[i] = 0, element
            elif opcode == "dynamic-update-slice":
                target, update = self._operands(element)[:2]
                if self.ops.get(target, ("",))[0] == "parameter":
                    written[i], params[i] = sum(shape_bytes(self.types[update])), target
        unread = set()
        for i, param in params.items():
            pattern = re.compile(r"%" + re.escape(param) + r"\b")
            users = [n for n, _, _, rest in body if pattern.search(rest.split(")")[0])]
            if users in ([root], [elements[i]]) or (not users and elements[i] == root):
                unread.add(int(re.match(r"\s*(\d+)\)", self.ops[param][1]).group(1)))
        result = (written, unread)
        self._in_place[computation] = result
        return result

    def executions(self) -> dict[str, int]:  # also sets .fused and .unknown_trip_counts
        """How many times each computation runs in one execution of the entry: a loop body
        trip-count times its caller, a fused or called computation as often as its caller.
        Reductions' scalar `to_apply` computations are left out (they hold no matmul).
        `fused`: the computations fusions call; `unknown_trip_counts`: the loops whose trip
        count could not be read, each counted as one iteration (as the cost analysis does)."""
        runs: dict[str, int] = {}
        unknown, self.fused = [], set()

        def visit(computation: str, times: int) -> None:
            runs[computation] = runs.get(computation, 0) + times
            for name, _, opcode, rest in self.instructions(computation):
                if opcode == "while":
                    n = self.trip_count(rest)
                    if n is None:
                        unknown.append(name)
                    body = re.search(r"body=%([\w.\-]+)", rest).group(1)
                    visit(body, times * (n if n is not None else 1))
                    continue
                kinds = "calls|branch_computations|called_computations" + (
                    "|to_apply" if opcode == "call" else "")
                for callees in re.findall(rf"(?:{kinds})=(\{{[^}}]*\}}|%[\w.\-]+)", rest):
                    for callee in re.findall(r"%([\w.\-]+)", callees):
                        if opcode == "fusion":
                            self.fused.add(callee)
                        visit(callee, times)

        if self.entry:
            visit(self.entry, 1)
        self.unknown_trip_counts = unknown
        return runs


def _convolution_flops(module: Module, out_dims: list[int], rest: str) -> int:
    """FLOPs of one `convolution` the way XLA's cost analysis counts them: 2 x input features
    per group x output features x input batch x, per spatial dimension, the (output, window)
    position pairs that land on the input rather than its padding."""
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    lhs = module.dims(operands[0])
    lhs_l, _, out_l = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest).groups()
    groups = int(re.search(r"feature_group_count=(\d+)", rest).group(1)) \
        if "feature_group_count" in rest else 1
    batch_groups = int(re.search(r"batch_group_count=(\d+)", rest).group(1)) \
        if "batch_group_count" in rest else 1
    fma = (lhs[lhs_l.index("f")] // groups) * out_dims[out_l.index("f")] * \
        (lhs[lhs_l.index("b")] // batch_groups)
    spatial = sorted(c for c in lhs_l if c.isdigit())
    window = {}
    w = re.search(r"window=\{([^}]*)\}", rest)
    for field in (w.group(1).split() if w else ()):
        key, value = field.split("=")
        window[key] = value.split("x")
    for j, d in enumerate(spatial):
        size = int(window.get("size", ["1"] * len(spatial))[j])
        lo = int(window["pad"][j].split("_")[0]) if "pad" in window else 0
        stride = int(window["stride"][j]) if "stride" in window else 1
        lhs_dilate = int(window["lhs_dilate"][j]) if "lhs_dilate" in window else 1
        rhs_dilate = int(window["rhs_dilate"][j]) if "rhs_dilate" in window else 1
        n_in, n_out = lhs[lhs_l.index(d)], out_dims[out_l.index(d)]
        o, k = np.meshgrid(np.arange(n_out), np.arange(size), indexing="ij", sparse=True)
        pos = o * stride - lo + k * rhs_dilate
        valid = (pos >= 0) & (pos <= (n_in - 1) * lhs_dilate) & (pos % lhs_dilate == 0)
        fma *= int(valid.sum())
    return 2 * fma


def _dot_flops(module: Module, out_dims: list[int], rest: str) -> int:
    """2 x output elements x the contracted size."""
    lhs = module.dims(re.findall(r"%([\w.\-]+)", rest.split(")")[0])[0])
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    k = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i) if contracting else 1
    return 2 * math.prod(out_dims) * k


def matmul_flops(module: Module, computation: str) -> tuple[int, int]:
    """FLOPs of the convolutions and dots directly in one computation: all of them, and those
    JAX's remat recomputes in the backward pass (their op_name holds "rematted_computation")."""
    total = recomputed = 0
    for name, _, opcode, rest in module.instructions(computation):
        if opcode not in ("convolution", "dot"):
            continue
        count = _convolution_flops if opcode == "convolution" else _dot_flops
        f = count(module, module.dims(name), rest)
        total += f
        recomputed += f if "rematted_computation" in rest else 0
    return total, recomputed


# Instructions that move no data of their own (views, tuples, loop plumbing).
# Control flow moves nothing itself: its bodies' instructions are counted where they run.
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "partition-id",
               "replica-id", "after-all", "iota", "while", "call", "conditional"}


def traffic_bytes(module: Module, computation: str, space: Optional[int] = None) -> int:
    """Bytes the top-level instructions of a computation read and write, each reading its
    operands whole and writing its result (what a fusion does inside stays on chip). An
    asynchronous op counts the arrays of its `-start` result, which holds its operand and its
    result (a prefetch `copy-start`: the HBM source and the VMEM copy). `space`: only arrays in
    that memory space (0: HBM), where a buffer left in place (a fusion's output that is its
    parameter unchanged or dynamically updated, a dynamic-update-slice) counts only the bytes
    written into it; None: all of them whole, as XLA's cost analysis counts bytes."""
    def size(type_text):
        return sum(n for n, where in _arrays(type_text) if space is None or where == space)

    def in_space(where):
        return space is None or where == space

    total = 0
    for name, type_text, opcode, rest in module.instructions(computation):
        if opcode in _NO_TRAFFIC or opcode.endswith("-done"):
            continue
        operands = module._operands(name)
        if opcode == "slice-start":  # ((source), slice, context): only the slice is read
            (_, source), (piece, destination) = _arrays(type_text)[:2]
            total += sum(piece for where in (source, destination) if in_space(where))
            continue
        written, unread = {}, set()
        if space is not None and opcode == "dynamic-update-slice":  # in place: the update
            written, unread = {0: sum(shape_bytes(module.types[operands[1]]))}, {0}
        elif space is not None and opcode == "fusion":
            written, unread = module.fusion_in_place(
                re.search(r"calls=%([\w.\-]+)", rest).group(1), len(_arrays(type_text)))
        total += sum(written.get(i, n) for i, (n, where) in enumerate(_arrays(type_text))
                     if in_space(where))
        if not opcode.endswith("-start"):
            total += sum(size(module.types[o]) for k, o in enumerate(operands)
                         if k not in unread and o in module.types)
    return total


def costs(text: "str | Module") -> dict:
    """What one step of a compiled module computes and moves, counted as it runs.

    `compiled.cost_analysis()` counts each computation once, so a loop's later iterations are
    missing from its FLOPs and bytes; and its bytes are every operand and result of every
    instruction, in whatever memory, on-chip VMEM included. Returns:
      loops, unknown_trip_counts: while instructions; those whose trip count could not be read
          (counted once, as the cost analysis does);
      matmul_flops: convolution and dot FLOPs as they run (for the data-parallel T5 steps this
          equals `mta_jax.flops`' analytic count to the FLOP);
      remat_flops: those of them that remat recomputes in the backward pass; matmul_flops -
          remat_flops is what the step needs (with every weight trained, `mta_jax.flops`'
          count; with a frozen backbone less, since no gradient is taken for frozen weights
          nor through the blocks below the lowest trained one: its frozen-backbone count);
      flops_left_out: the matmul FLOPs of the iterations the cost analysis does not count;
      bytes_left_out: the bytes those iterations move, counted the cost analysis's way;
      hbm_bytes: the bytes the step's top-level instructions read from and write to arrays in
          HBM (memory space 0), prefetches and evictions included, as they run: an estimate
          of HBM traffic that leaves out what stays in VMEM and buffers left in place.
    """
    module = text if isinstance(text, Module) else Module(text)
    flops_once = flops_run = remat = left_bytes = hbm = loops = 0
    for computation, times in module.runs.items():
        f, recomputed = matmul_flops(module, computation)
        flops_once, flops_run = flops_once + f, flops_run + f * times
        remat += times * recomputed
        if computation in module.fused:
            continue
        hbm += times * traffic_bytes(module, computation, space=0)
        if times > 1:
            left_bytes += (times - 1) * traffic_bytes(module, computation)
        loops += sum(1 for _, _, op, _ in module.instructions(computation) if op == "while")
    return {"loops": loops, "unknown_trip_counts": len(module.unknown_trip_counts),
            "matmul_flops": flops_run, "remat_flops": remat,
            "flops_left_out": flops_run - flops_once,
            "bytes_left_out": left_bytes, "hbm_bytes": hbm}
