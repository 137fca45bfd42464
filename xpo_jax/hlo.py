"""Read a compiled XLA program: its collectives, the while loops around them, and its arithmetic
and memory traffic with every loop's trip count applied.

    module = hlo.parse(jitted.lower(*args).compile().as_text())   # per-device, SPMD-partitioned
    t = hlo.traffic(module, trip_count=hlo.round_trip_counts(max_new_tokens))
    t.collectives        every collective, with its shapes, bytes, computation and enclosing loops
    t.bytes_by_class     {"sampling_loops": ..., "training": ..., "other": ...} bytes per device
    t.flops, t.hbm_bytes the program's FLOPs and memory traffic per device, loops multiplied out

Why not `compiled.cost_analysis()` alone: XLA's HloCostAnalysis counts a while loop's body
once, whatever its trip count (measured: `lax.fori_loop(0, 10, ...)` over a matmul reports the
FLOPs of one matmul, jax 0.10.2 CPU), and knows nothing of collectives. A round is loops
inside loops (the decode loop over tokens, the scan over layers inside it, the update scan),
so we read the optimised per-device HLO text ourselves and multiply each instruction by the
trip counts of the loops that enclose it. Loops with a trip count XLA proved
(`known_trip_count` in the while's backend_config: scans, fori loops) use it; the sampler's
early-exit decode loop has none, and `round_trip_counts` supplies its upper bound.

Bytes of a collective, per device (`Collective.bytes`): the size of the whole array the
collective handles on one device -- the RESULT for an all-gather (the gathered array), the
OPERAND for all-reduce, reduce-scatter, all-to-all and collective-permute (the array before it
is reduced / split / exchanged). One number per collective that equals a tensor's size (an
all-gather of a weight reports the weight's bytes; an all-reduce of a gradient the gradient's),
independent of the algorithm. `Collective.wire_bytes` is what each device sends (= receives)
with the bandwidth-optimal ring algorithms, for time estimates (NCCL's "bus bytes"): with n
devices in the group, all-gather (n-1)/n x result, reduce-scatter and all-to-all (n-1)/n x
operand, all-reduce 2 (n-1)/n x operand (a reduce-scatter then an all-gather), collective-
permute the operand. Async pairs (`-start` / `-done`) are counted once, at the start.

Conditionals (`lax.cond`): the costliest branch counts (an upper bound: which branch runs is a
run-time value); `Collective.branch` marks collectives that sit in a branch.

FLOPs: dots count 2 x (result elements) x (contracted elements); elementwise ops one per
result element (exp, log, rsqrt, ... go to `transcendentals`, as XLA does); reduces one per
input element. HBM bytes: for every instruction outside fusions, the bytes of its operands
and result (a fusion that only slices an operand is charged the slice; an in-place
dynamic-update-slice the update), the same rule as XLA's cost analysis to within a few
per cent on our programs (`Traffic.xla_check` compares the two with every loop counted once).

The stack of Python frames each instruction came from (`Collective.stack`) is read from the
module's StackFrames table (jax >= 0.6 writes one); `round_phase` uses it to say which part of
the fused XPO round a collective belongs to.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Iterable, Optional, Sequence

# Bytes per element of XLA's primitive types (sub-byte types rounded up: they are not used here).
DTYPE_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "f8e4m3": 1, "f8e3m4": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e8m0fnu": 1,
    "f4e2m1fn": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0,
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
_COLLECTIVE_OPCODES = {c: c for c in COLLECTIVES} | {c + "-start": c for c in COLLECTIVES}
# Ops that move no data of their own (views, tuples, control flow whose bodies are counted).
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "conditional",
         "call", "after-all", "add-dependency", "partition-id", "replica-id", "opt-barrier",
         "optimization-barrier", "domain", "iota", "fusion-done"} | {c + "-done" for c in COLLECTIVES} | {"async-done"}
# cuBLAS matmuls as the GPU backend writes them: custom-calls whose result tuple ends in a
# workspace buffer (scratch, not traffic); their FLOPs come from the dot dimensions in backend_config.
_GEMM_TARGETS = ('"__cublas$gemm"', '"__cublas$lt$matmul"')
_TRANSCENDENTAL = {"exponential", "exponential-minus-one", "log", "log-plus-one", "rsqrt", "sqrt",
                   "cbrt", "tanh", "logistic", "sine", "cosine", "tan", "atan2", "power", "erf"}
_ELEMENTWISE = _TRANSCENDENTAL | {
    "add", "subtract", "multiply", "divide", "remainder", "maximum", "minimum", "negate", "abs",
    "sign", "floor", "ceil", "round-nearest-afz", "round-nearest-even", "compare", "select", "clamp",
    "and", "or", "xor", "not", "shift-left", "shift-right-logical", "shift-right-arithmetic",
    "convert", "is-finite", "real", "imag", "popcnt", "count-leading-zeros", "stochastic-convert"}


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Array:
    """One array shape: dtype name as XLA prints it (f32, bf16, s32, ...) and dimensions."""

    dtype: str
    dims: tuple

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    @property
    def nbytes(self) -> int:
        return self.size * DTYPE_BYTES.get(self.dtype, 4)

    def __str__(self):
        return f"{self.dtype}[{','.join(map(str, self.dims))}]"


_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


def parse_shape(text: str) -> list:
    """All array shapes in a (possibly tuple) HLO shape string, flattened, layouts ignored."""
    out = []
    for dtype, dims in _ARRAY.findall(text):
        if dtype in DTYPE_BYTES:
            out.append(Array(dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


@dataclasses.dataclass(frozen=True)
class Frame:
    file: str
    function: str
    line: int


@dataclasses.dataclass
class Instr:
    name: str
    opcode: str
    shape: list          # [Array], flattened
    operands: list       # names of operand instructions
    attrs: str           # everything after the operand list
    args: str            # the operand list as written (a parameter's number, a constant's value)
    computation: str
    op_name: str = ""
    frame_id: Optional[int] = None
    root: bool = False

    def called(self, *roles: str) -> list:
        """Names of the computations this instruction calls in the given roles (body, condition,
        calls, to_apply, branch_computations, true_computation, false_computation)."""
        out = []
        for role in roles:
            if role == "branch_computations":
                m = re.search(r"branch_computations=\{([^}]*)\}", self.attrs)
                if m:
                    out += re.findall(r"%([\w.\-]+)", m.group(1))
            else:
                out += re.findall(rf"\b{role}=%([\w.\-]+)", self.attrs)
        return out

    @property
    def known_trip_count(self) -> Optional[int]:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', self.attrs)
        return int(m.group(1)) if m else None


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list
    entry: bool = False


def _matching(text: str, start: int) -> int:
    """Index of the bracket closing the one at text[start] ('(' or '{')."""
    open_, close = text[start], {"(": ")", "{": "}"}[text[start]]
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {open_!r} in HLO text at {text[start:start + 80]!r}")


_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")


def _parse_instr(line: str, computation: str) -> Optional[Instr]:
    m = _INSTR.match(line)
    if not m:
        return None
    name, rest = m.group(2), m.group(3)
    if rest.startswith("("):
        j = _matching(rest, 0)
        shape_text, after = rest[: j + 1], rest[j + 1:].lstrip()
    else:
        shape_text, _, after = rest.partition(" ")
    mo = re.match(r"([\w\-]+)\(", after)
    if not mo:
        return None
    opcode = mo.group(1)
    k = _matching(after, len(opcode))
    operands = re.findall(r"%([\w.\-]+)", after[len(opcode): k + 1])
    attrs, args = after[k + 1:], after[len(opcode) + 1: k]
    op_name = re.search(r'op_name="([^"]*)"', attrs)
    frame = re.search(r"stack_frame_id=(\d+)", attrs)
    return Instr(name, opcode, parse_shape(shape_text), operands, attrs, args, computation,
                 op_name.group(1) if op_name else "", int(frame.group(1)) if frame else None, bool(m.group(1)))


class HloModule:
    """The computations, instructions and stack-frame table of one HLO module's text."""

    def __init__(self, text: str):
        self.text = text
        self.computations: dict = {}
        self.instrs: dict = {}
        self.entry: Optional[str] = None
        m = re.search(r"num_partitions=(\d+)", text)
        self.num_partitions = int(m.group(1)) if m else 1
        self._tables: dict = {}
        current: Optional[Computation] = None
        table = None
        for line in text.splitlines():
            if current is None:
                if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                    table = self._tables.setdefault(line, {})
                    continue
                h = _HEADER.match(line)
                if h and not line.startswith("HloModule"):
                    current = Computation(h.group(2), [], entry=bool(h.group(1)))
                    table = None
                    continue
                if table is not None and line.strip():
                    k, _, v = line.partition(" ")
                    if k.isdigit():
                        table[int(k)] = v
                continue
            if line.strip() == "}":
                self.computations[current.name] = current
                if current.entry:
                    self.entry = current.name
                current = None
                continue
            ins = _parse_instr(line, current.name)
            if ins is not None:
                current.instrs.append(ins)
                self.instrs[ins.name] = ins
        if self.entry is None:
            raise ValueError("no ENTRY computation in the HLO text (pass compiled.as_text())")
        self._frames: dict = {}

    # -- stack frames: FileNames / FunctionNames / FileLocations / StackFrames tables ----------

    def stack(self, frame_id: Optional[int]) -> list:
        """The Python frames of `frame_id`, innermost first ([] without a table)."""
        out, seen = [], set()
        while frame_id and frame_id not in seen:
            seen.add(frame_id)
            entry = self._tables.get("StackFrames", {}).get(frame_id)
            if entry is None:
                break
            loc = int(re.search(r"file_location_id=(\d+)", entry).group(1))
            parent = int(re.search(r"parent_frame_id=(\d+)", entry).group(1))
            out.append(self._frame(loc))
            # The text prints the parent's id plus one (0 would be "none"): frame 1's parent
            # prints as 1, and a frame called from frame k prints parent k + 1.
            frame_id = parent - 1
        return out

    def _frame(self, loc: int) -> Frame:
        if loc not in self._frames:
            v = self._tables["FileLocations"][loc]
            f = int(re.search(r"file_name_id=(\d+)", v).group(1))
            fn = int(re.search(r"function_name_id=(\d+)", v).group(1))
            line = int(re.search(r"\bline=(\d+)", v).group(1))
            unq = lambda s: s.strip().strip('"')
            self._frames[loc] = Frame(unq(self._tables["FileNames"][f]), unq(self._tables["FunctionNames"][fn]),
                                      line)
        return self._frames[loc]

    def operand_shapes(self, ins: Instr) -> list:
        return [a for o in ins.operands if o in self.instrs for a in self.instrs[o].shape]


def parse(text: str) -> HloModule:
    """Parse the text of an optimised HLO module (`compiled.as_text()`)."""
    return HloModule(text)


# ----------------------------------------------------------------------------------------------
# Loops, collectives, traffic
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Loop:
    """One enclosing while loop (or conditional branch, `trip` 1) on a collective's path."""

    name: str                 # the while (or conditional) instruction
    op_name: str
    stack: tuple              # Frames, innermost first
    known_trip_count: Optional[int]
    trip: int                 # the count used (known, or from the trip_count callback)
    kind: str = "while"       # "while", "condition" (the loop's condition: trip + 1 runs) or "branch"
    sampling: bool = False    # a decode loop of xpo_jax/sampling.py (`is_sampling_loop`)


@dataclasses.dataclass
class Collective:
    kind: str                 # all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute, ...
    opcode: str               # as written (e.g. all-gather-start)
    name: str
    computation: str
    operands: list            # [Array] per device
    results: list             # [Array] per device (the async form's tuple, as written)
    group_size: int
    bytes: int                # per execution, per device (module docstring)
    wire_bytes: float         # per execution, per device, ring algorithms
    loops: tuple              # enclosing Loops, outermost first
    op_name: str
    stack: tuple              # Frames, innermost first
    devices: int = 1          # the program's partitions (num_partitions)
    phase: str = ""
    cls: str = ""

    @property
    def count(self) -> int:
        """Executions per program run (upper bound): the product of the enclosing trip counts."""
        return math.prod(l.trip for l in self.loops)

    @property
    def branch(self) -> bool:
        return any(l.kind == "branch" for l in self.loops)

    @property
    def in_sampling_loop(self) -> bool:
        return any(l.sampling for l in self.loops)

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.count

    def describe(self) -> str:
        loops = " > ".join(f"{_short(l.op_name)}x{l.trip}" for l in self.loops) or "-"
        return (f"{self.kind} {'+'.join(map(str, self.operands))} -> {'+'.join(map(str, self.results))} "
                f"(group {self.group_size}) {self.bytes} B x {self.count} [{self.phase}] in {self.computation}; "
                f"loops: {loops}; {_short(self.op_name)}")


def _short(op_name: str, keep: int = 4) -> str:
    parts = op_name.split("/")
    return "/".join(parts[-keep:]) if len(parts) > keep else op_name


def group_size(ins: Instr, num_partitions: int) -> int:
    """Devices in each replica group of a collective (the whole program's when unspecified)."""
    a = ins.attrs
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", a)
    if m:  # mesh['axis_0'=1,'axis_1'=8] {'axis_1'}: the product of the named axes' sizes
        sizes = dict((k, int(v)) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        names = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(sizes[n] for n in names) if names else 1
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", a)
    if m:  # iota form [groups, size]<=[...]
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([^}]*)\}", a)
    if m:
        return len(m.group(1).split(","))
    return num_partitions


def _collective_bytes(kind: str, operand_bytes: int, n: int) -> tuple:
    if kind == "all-gather":
        return operand_bytes * n, operand_bytes * (n - 1)
    if kind == "all-reduce":
        return operand_bytes, 2.0 * operand_bytes * (n - 1) / n
    if kind in ("reduce-scatter", "all-to-all", "ragged-all-to-all"):
        return operand_bytes, operand_bytes * (n - 1) / n
    return operand_bytes, float(operand_bytes)  # collective-permute, collective-broadcast


def is_sampling_loop(ins: Instr, stack: Sequence) -> bool:
    """A decode loop of xpo_jax/sampling.py: a while loop written there (its innermost Python
    frame is in sampling.py) with no trip count XLA could prove -- the sampler's `lax.while_loop`
    exits early, while the loops of the PRNG (threefry) and the layer scans have known counts.
    Without a stack-frame table, the name stack: "..._sample_jit)/while"."""
    if ins.opcode != "while" or ins.known_trip_count is not None:
        return False
    if stack:
        return stack[0].file.endswith("sampling.py")
    return ins.op_name.endswith("_sample_jit)/while")


def round_trip_counts(max_new_tokens: int, sampling_trips: Optional[int] = None) -> Callable:
    """trip_count callback for a round: XLA's known count; for the sampler's decode loop its upper
    bound, max_new_tokens - 1 (the first token comes from the prefill's logits, before the loop;
    the loop's condition is `step < max_new_tokens` from step 1); `sampling_trips` overrides it
    (e.g. max_new_tokens, the convention of issue 17's figures)."""
    n = max_new_tokens - 1 if sampling_trips is None else sampling_trips

    def trips(loop: Loop) -> Optional[int]:
        if loop.known_trip_count is not None:
            return loop.known_trip_count
        return n if loop.sampling else None

    return trips


def known_trip_counts(loop: Loop) -> Optional[int]:
    """The default trip_count: XLA's proven count, or None (an error names the loop)."""
    return loop.known_trip_count


def once(loop: Loop) -> int:
    """trip_count that runs every loop once: the convention of XLA's own cost analysis."""
    return 1


# Phases of the fused XPO round (round_phase) and the three classes issue 17 reports.
PHASE_CLASS = {
    "sampling loop": "sampling_loops",
    "training": "training",
    "sampling, outside the loops": "other",
    "reward model": "other",
    "reference forward": "other",
    "other": "other",
}
CLASSES = ("sampling_loops", "training", "other")


def round_phase(c: Collective) -> str:
    """Which part of xpo_jax's fused round (`round.make_round(...).round_fn`) a collective is in:

      "sampling loop"                inside a decode loop of sampling.py (any enclosing loop)
      "training"                     the policy's forward, backward and optimiser step: frames in
                                     round.py's `update.<locals>.step` (grads, micro-batch scan,
                                     AdamW), or a `jvp(` / `transpose(` name stack
      "sampling, outside the loops"  the prefill, the cache set-up, the random draws
      "reward model"                 the oracle (xpo_jax/oracles.py)
      "reference forward"            round.py's `update` outside its step: the reference's
                                     log-probs, the metrics
      "other"                        anything else (key splits, the round's glue)
    A collective without frames inherits them from its innermost enclosing loop."""
    if c.in_sampling_loop:
        return "sampling loop"
    stack = c.stack
    if not stack:
        for l in reversed(c.loops):
            if l.stack:
                stack = l.stack
                break
    funcs = {f.function for f in stack}
    files = {f.file.rsplit("/", 1)[-1] for f in stack}
    if "make_round.<locals>.update.<locals>.step" in funcs or "transpose(" in c.op_name or "jvp(" in c.op_name:
        return "training"
    if "sampling.py" in files:
        return "sampling, outside the loops"
    if "oracles.py" in files:
        return "reward model"
    if "make_round.<locals>.update" in funcs:
        return "reference forward"
    if "_sample_jit" in c.op_name:
        return "sampling, outside the loops"
    return "other"


@dataclasses.dataclass
class Traffic:
    collectives: list          # every Collective, in program order (a computation called twice: twice)
    bytes_by_class: dict       # class -> bytes per device per run (costliest branch of each conditional)
    wire_bytes_by_class: dict
    bytes_by_phase: dict
    flops: float               # per device per run, loops multiplied out
    transcendentals: float
    hbm_bytes: float
    dot_flops: float
    xla_flops: float           # `flops` with XLA's rule for reduce-window (window x outputs)
    branch_bytes_by_class: dict  # the part of bytes_by_class in conditional branches (may not run)

    @property
    def collective_bytes(self) -> int:
        return sum(self.bytes_by_class.values())

    @property
    def wire_bytes(self) -> float:
        return sum(self.wire_bytes_by_class.values())


def traffic(module: HloModule | str, trip_count: Callable = known_trip_counts,
            phase: Callable = round_phase, phase_class: Optional[dict] = None) -> Traffic:
    """Walk `module` from its entry: every collective with its loops, and the per-device totals
    with each loop body counted trip times (its condition trip + 1 times) and each conditional
    counted as its costliest branch. `trip_count(Loop) -> int | None`: the trips of a loop (None
    raises, naming the loop); `phase(Collective) -> str`, mapped to a class by `phase_class`
    (default PHASE_CLASS; unknown phases go to "other")."""
    if isinstance(module, str):
        module = parse(module)
    phase_class = PHASE_CLASS if phase_class is None else phase_class
    found: list = []
    totals = _walk(module, module.entry, (), trip_count, phase, phase_class, found)
    by_class = {k: totals.get(("bytes", k), 0.0) for k in CLASSES}
    wire = {k: totals.get(("wire", k), 0.0) for k in CLASSES}
    for key, v in totals.items():  # classes outside CLASSES (a custom phase_class)
        if key[0] == "bytes" and key[1] not in by_class:
            by_class[key[1]], wire[key[1]] = v, totals.get(("wire", key[1]), 0.0)
    phases = {key[1]: v for key, v in totals.items() if key[0] == "phase"}
    flops = totals.get(("flops",), 0.0)
    branch: dict = {}
    for c in found:
        if c.branch:
            branch[c.cls] = branch.get(c.cls, 0) + c.total_bytes
    return Traffic(found, {k: int(round(v)) for k, v in by_class.items()}, wire, phases, flops,
                   totals.get(("transcendentals",), 0.0), totals.get(("hbm",), 0.0),
                   totals.get(("dot_flops",), 0.0), flops + totals.get(("xla_extra_flops",), 0.0), branch)


def _add(acc: dict, other: dict, factor: float = 1.0) -> None:
    for k, v in other.items():
        acc[k] = acc.get(k, 0.0) + factor * v


def _walk(module, comp_name, loops, trip_count, phase, phase_class, found) -> dict:
    comp = module.computations[comp_name]
    acc: dict = {}
    for ins in comp.instrs:
        op = ins.opcode
        if op in _COLLECTIVE_OPCODES:
            c = _collective(module, ins, loops)
            c.phase = phase(c)
            c.cls = phase_class.get(c.phase, "other")
            found.append(c)
            _add(acc, {("bytes", c.cls): c.bytes, ("wire", c.cls): c.wire_bytes, ("phase", c.phase): c.bytes})
        if op == "while":
            stack = tuple(module.stack(ins.frame_id))
            loop = Loop(ins.name, ins.op_name, stack, ins.known_trip_count, 0,
                        sampling=is_sampling_loop(ins, stack))
            trip = trip_count(loop)
            if trip is None:
                src = f" ({stack[0].file}:{stack[0].line})" if stack else ""
                raise ValueError(f"while loop {ins.name} ({ins.op_name!r}){src} has no known trip count; "
                                 "pass trip_count= that returns one for it (e.g. round_trip_counts)")
            loop = dataclasses.replace(loop, trip=int(trip))
            body, = ins.called("body")
            cond, = ins.called("condition")
            _add(acc, _walk(module, body, loops + (loop,), trip_count, phase, phase_class, found), trip)
            cloop = dataclasses.replace(loop, kind="condition", trip=int(trip) + 1)
            _add(acc, _walk(module, cond, loops + (cloop,), trip_count, phase, phase_class, found), trip + 1)
        elif op == "conditional":
            branches = ins.called("branch_computations") or ins.called("true_computation", "false_computation")
            stack = tuple(module.stack(ins.frame_id))
            best: dict = {}
            for b in branches:
                bl = Loop(ins.name, ins.op_name, stack, None, 1, kind="branch")
                t = _walk(module, b, loops + (bl,), trip_count, phase, phase_class, found)
                for k in set(best) | set(t):
                    best[k] = max(best.get(k, 0.0), t.get(k, 0.0))
            _add(acc, best)
        elif op == "call" or op.startswith("async-start"):
            for callee in ins.called("to_apply", "calls"):
                _add(acc, _walk(module, callee, loops, trip_count, phase, phase_class, found))
        elif op in ("fusion", "fusion-start"):  # fusion-start: the GPU's asynchronous fusion
            for callee in ins.called("calls"):
                _add(acc, _fused_flops(module, callee))
        _add(acc, _own_cost(module, ins))
    return acc


def _collective(module: HloModule, ins: Instr, loops: tuple) -> Collective:
    kind = _COLLECTIVE_OPCODES[ins.opcode]
    operands = module.operand_shapes(ins)
    n = group_size(ins, module.num_partitions)
    op_bytes = sum(a.nbytes for a in operands)
    nbytes, wire = _collective_bytes(kind, op_bytes, n)
    return Collective(kind, ins.opcode, ins.name, ins.computation, operands, list(ins.shape), n, int(nbytes),
                      float(wire), loops, ins.op_name, tuple(module.stack(ins.frame_id)), module.num_partitions)


def _is_gemm(ins: Instr) -> bool:
    return ins.opcode == "custom-call" and any(t in ins.attrs for t in _GEMM_TARGETS)


def _gemm_result(ins: Instr) -> list:
    """A cuBLAS custom-call's results without its workspace (the tuple's last element)."""
    return ins.shape[:-1] if len(ins.shape) > 1 else ins.shape


def _flops_of(module: HloModule, ins: Instr) -> dict:
    op = ins.opcode
    out = sum(a.size for a in ins.shape)
    if _is_gemm(ins):
        lhs = module.instrs[ins.operands[0]].shape[0]
        m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
        dims = re.findall(r"\d+", m.group(1)) if m else []
        f = 2.0 * sum(a.size for a in _gemm_result(ins)) * math.prod(lhs.dims[int(d)] for d in dims)
        return {("flops",): f, ("dot_flops",): f}
    if op == "dot":
        lhs = module.instrs[ins.operands[0]].shape[0]
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
        k = math.prod(lhs.dims[int(d)] for d in m.group(1).split(",") if d) if m else 1
        f = 2.0 * out * k
        return {("flops",): f, ("dot_flops",): f}
    if op == "convolution":
        # 2 x output elements x (kernel elements / output features): not used by our models.
        kernel = module.instrs[ins.operands[1]].shape[0]
        m = re.search(r"dim_labels=[^_]*_([^-]*)->", ins.attrs)
        o = kernel.dims[m.group(1).index("o")] if m and "o" in m.group(1) else 1
        f = 2.0 * out * kernel.size / max(o, 1)
        return {("flops",): f, ("dot_flops",): f}
    if op in _TRANSCENDENTAL:
        return {("transcendentals",): float(out)}
    if op in _ELEMENTWISE:
        return {("flops",): float(out)}
    if op in ("reduce", "reduce-window"):
        n_in = sum(a.size for a in module.operand_shapes(ins)[: max(1, len(ins.operands) // 2)])
        acc = {("flops",): float(n_in)}
        if op == "reduce-window":
            # XLA's cost model charges window size x outputs: a cumsum over V written as a
            # reduce-window of size V costs V^2 there, while backends rewrite it as a scan
            # (n log n). We count one per input element; the difference is kept apart so that
            # `Traffic.xla_flops` can be compared with cost_analysis().
            m = re.search(r"window=\{size=([0-9x]+)", ins.attrs)
            window = math.prod(int(d) for d in m.group(1).split("x")) if m else 1
            acc[("xla_extra_flops",)] = float(out * window - n_in)
        return acc
    return {}


def _fused_flops(module: HloModule, comp_name: str) -> dict:
    acc: dict = {}
    for ins in module.computations[comp_name].instrs:
        _add(acc, _flops_of(module, ins))
        if ins.opcode == "fusion":
            for callee in ins.called("calls"):
                _add(acc, _fused_flops(module, callee))
    return acc


def _own_cost(module: HloModule, ins: Instr) -> dict:
    """FLOPs and HBM bytes of one instruction outside fusions (a fusion's FLOPs come from its
    body in _walk; here its memory traffic)."""
    op = ins.opcode
    acc = {} if op == "fusion" else _flops_of(module, ins)
    if op in _FREE or op.startswith("async-"):
        return acc
    out = sum(a.nbytes for a in ins.shape)
    if op in _COLLECTIVE_OPCODES:
        # A collective reads its operand from and writes its result to HBM (XLA's cost analysis
        # charges the same); the bytes it sends between devices are reported separately.
        if op.startswith("all-reduce") or op.startswith("reduce-scatter"):
            acc[("flops",)] = float(sum(a.size for a in module.operand_shapes(ins)))  # the reduction, as XLA
        acc[("hbm",)] = float(sum(a.nbytes for a in module.operand_shapes(ins)) + (0 if op.endswith("-start") else out))
        return acc
    if op == "dynamic-update-slice":
        upd = sum(a.nbytes for a in module.instrs[ins.operands[1]].shape)
        acc[("hbm",)] = 2.0 * upd
        return acc
    if op in ("dynamic-slice", "slice"):
        acc[("hbm",)] = 2.0 * out
        return acc
    if op == "fusion":
        acc[("hbm",)] = float(_fusion_bytes(module, ins, out))
        return acc
    if op == "fusion-start":
        # ((operands...), results..., u32[] context): charge the fusion its results only once
        # (fusion-done, free, hands them over), and its operands as a fusion's.
        n_in = len(module.operand_shapes(ins))
        results = ins.shape[n_in:-1] if len(ins.shape) > n_in + 1 else ins.shape[n_in:]
        acc[("hbm",)] = float(_fusion_bytes(module, ins, sum(a.nbytes for a in results)))
        return acc
    if _is_gemm(ins):
        acc[("hbm",)] = float(sum(a.nbytes for a in _gemm_result(ins)) + sum(a.nbytes for a in module.operand_shapes(ins)))
        return acc
    acc[("hbm",)] = float(out + sum(a.nbytes for a in module.operand_shapes(ins)))
    return acc


def _fusion_bytes(module: HloModule, ins: Instr, out: int) -> int:
    """Operand + result bytes of a fusion, charging an operand that is only sliced inside the
    fusion its slices, and an in-place dynamic-update-slice root its update only."""
    callee, = ins.called("calls")
    body = module.computations[callee]
    params = {}
    for i2 in body.instrs:
        if i2.opcode == "parameter":
            params[i2.name] = int(i2.args)
    users: dict = {}
    for i2 in body.instrs:
        for o in i2.operands:
            users.setdefault(o, []).append(i2)
    by_name = {i2.name: i2 for i2 in body.instrs}

    def peel(i2):  # through converts and bitcasts: the CPU backend wraps a bf16 update in f32 ones
        while i2 is not None and i2.opcode in ("convert", "bitcast", "copy") and i2.operands:
            i2 = by_name.get(i2.operands[0])
        return i2

    root = peel(next((i2 for i2 in body.instrs if i2.root), None))
    in_place = set()
    if root is not None and root.opcode == "dynamic-update-slice":
        target = peel(by_name.get(root.operands[0]))
        if target is not None and target.name in params:
            # Updated in place (the buffer is the loop carry): only the update is written. The
            # CPU backend converts a bf16 buffer to f32 around the update; a TPU or GPU does not.
            in_place.add(target.name)
            upd = by_name.get(root.operands[1])
            out = sum(a.nbytes for a in upd.shape) if upd is not None else out
    total = out
    for pname, idx in params.items():
        if pname in in_place:
            continue
        us = users.get(pname, [])
        if us and all(u.opcode in ("dynamic-slice", "slice", "gather") and u.operands[0] == pname for u in us):
            total += sum(a.nbytes for u in us for a in u.shape)
        elif idx < len(ins.operands) and ins.operands[idx] in module.instrs:
            total += sum(a.nbytes for a in module.instrs[ins.operands[idx]].shape)
    return total


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------


def weight_shapes(params, layer_key: str = "layers", min_size: int = 1024) -> set:
    """The whole shapes of the matrices among the leaves of `params` (a pytree of arrays or
    ShapeDtypeStructs): for stacked layers (a path through `layer_key`, scan_layers) both the
    stack and one layer's slice (as the layer scan sees it). Left out: leaves whose (per-layer)
    shape has fewer than 2 dimensions above 1 or fewer than `min_size` elements -- norm scales,
    biases, a reward model's [D, 1] score head: small, and too easily an activation's block. `moves_weight` matches collectives against
    these and their tiles."""
    import jax

    out = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        shape = tuple(int(d) for d in leaf.shape)
        stacked = any(getattr(k, "key", getattr(k, "name", None)) == layer_key for k in path)
        one = shape[1:] if stacked else shape
        if sum(d > 1 for d in one) < 2 or math.prod(one) < min_size:
            continue
        out |= {shape, one}
    return out


def is_tile(shape: Sequence[int], whole: Sequence[int], devices: int) -> bool:
    """Whether `shape` is a block of `whole` that a sharding over at most `devices` devices can
    give one device: the same rank, every dimension dividing the whole's, and the product of the
    ratios dividing `devices` (the whole itself included)."""
    if len(shape) != len(whole) or any(d <= 0 or w % d for d, w in zip(shape, whole)):
        return False
    return devices % math.prod(w // d for d, w in zip(shape, whole)) == 0


def moves_weight(c: Collective, shapes: set) -> bool:
    """True when the collective moves (a block of) a weight: for some input / output pair of it
    (an all-gather's shard and gathered array, an all-reduce's or reduce-scatter's gradient
    before and after, an all-to-all's or permute's blocks), both arrays are tiles (`is_tile`) of
    one weight shape of `shapes` (from `weight_shapes`), any dtype. Asking both sides keeps
    activations out that merely share one side's shape with a weight's block (at 64 devices the
    [1, 4096] -> [64, 4096] gather of a decode step's hidden states has a q-kernel shard for its
    result, but its operand is no block of a [4096, 4096] weight). Shapes only: an activation
    whose two sides are both blocks of one weight would count too (that takes a batch of at least
    d_model rows)."""
    outs = list(c.results)
    if c.opcode.endswith("-start") and len(outs) > len(c.operands):
        outs = outs[len(outs) - len(c.operands):]  # an async start's tuple holds its inputs first
    n = max(c.devices, c.group_size)
    for a, b in zip(c.operands, outs):
        for w in shapes:
            if is_tile(a.dims, w, n) and is_tile(b.dims, w, n):
                return True
    return False


def weight_gathers_in_sampling_loops(compiled_text: str | HloModule | Traffic, param_shapes: set,
                                     max_new_tokens: int = 2) -> list:
    """The collectives inside a decode loop of the sampler that move a weight (`moves_weight`
    against `param_shapes`, from `weight_shapes`): what issue 17 requires to be empty.
    `max_new_tokens` only scales the reported counts."""
    t = compiled_text if isinstance(compiled_text, Traffic) else traffic(
        compiled_text, trip_count=round_trip_counts(max_new_tokens))
    return [c for c in t.collectives if c.in_sampling_loop and moves_weight(c, param_shapes)]


def summarize(collectives: Iterable[Collective], top: int = 20, weights: Optional[set] = None) -> list:
    """Lines: the collectives grouped by (class, phase, kind, shapes, loops), largest total first."""
    groups: dict = {}
    for c in collectives:
        key = (c.cls, c.phase, c.kind, tuple(map(str, c.operands)), tuple(map(str, c.results)),
               tuple(f"{_short(l.op_name, 2)}x{l.trip}" for l in c.loops))
        g = groups.setdefault(key, [0, 0, c])
        g[0] += 1
        g[1] += c.total_bytes
    rows = sorted(groups.items(), key=lambda kv: -kv[1][1])
    lines = []
    for (cls, ph, kind, ops, res, loops), (n, total, c) in rows[:top]:
        w = " WEIGHT" if weights is not None and moves_weight(c, weights) else ""
        lines.append(f"{total / 1e9:10.3f} GB  {n:3d} x {kind:18s} {'+'.join(ops)} -> {'+'.join(res)} "
                     f"x{c.count} [{ph}]{w} loops: {' > '.join(loops) or '-'}")
    return lines
