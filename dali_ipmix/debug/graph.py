"""``dali-ipmix graph``: the training pipeline's operator graph as DOT, rendered with Graphviz,
plus a text summary (operators by type and device, conditional split/merge nodes, longest path).

The graph is read from the pipeline DALI itself collected: ``Pipeline._ops``, every operator
reachable from the outputs, topologically sorted (DALI 2.4 has no public accessor for it), each
with its input DataNodes (their ``.source`` is the producing operator) and its ``OpSpec``, whose
text holds the schema, the device and the Python call stack that created the operator
(``_origin_stack_*``, DALI's tracing).  One DOT node per operator, so the node count is the
pipeline's own operator count.  DALI's backend then merges identical operators (same schema,
arguments and inputs) and adds ``MakeContiguous`` copies for the outputs; that executed graph is
what ``pipe.save_graph_to_dot_file`` writes, and its size is reported too.

``--collapse`` also writes two readable views: the graph with all splits of one ``if`` folded
into one node (and its merges into another), and an overview grouping the operators by the
project function that created them (the call stack: ``chain_step > image_op > select > rotate``).
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .. import config as C
from ..errors import UserError
from . import _common
from ._ops import OpNode, defined_ops, op_nodes

BACKENDS = ("fused", "dali", "none")
FORMATS = ("svg", "png")
# dot took 19 s for a 2k-node graph and did not finish in 6 min for the 14k-node readable
# ImageNet graph (2-core machine), so bigger graphs are written as DOT only.
DEFAULT_MAX_RENDER_NODES = 2500
DEFAULT_RENDER_TIMEOUT = 120
SPLIT, MERGE = "conditional.Split", "conditional.Merge"
DEVICE_COLORS = {"cpu": "#dbe9f6", "gpu": "#d9f2d0", "mixed": "#fde2c4"}


# ---------------------------------------------------------------------------------------------
# The operator graph (operator records: ``_ops``).

def output_ops(pipe) -> List[str]:
    """The operator producing each pipeline output, in output order."""
    defined_ops(pipe)
    return [node.source.name for node in pipe._graph_outputs]


def conditional_kind(node: OpNode) -> Optional[str]:
    return {SPLIT: "split", MERGE: "merge"}.get(node.type)


def longest_path(nodes: Sequence[OpNode]) -> List[str]:
    """The longest chain of operators (counted in operators) from a source to a sink.
    ``nodes`` are topologically sorted, inputs first (as DALI collects them)."""
    length, prev = {}, {}
    for node in nodes:
        best, via = 0, None
        for src, _ in node.inputs:
            if length.get(src, 0) > best:
                best, via = length[src], src
        length[node.name], prev[node.name] = best + 1, via
    if not length:
        return []
    end = max(length, key=length.get)
    path = [end]
    while prev[path[-1]] is not None:
        path.append(prev[path[-1]])
    return path[::-1]


# ---------------------------------------------------------------------------------------------
# Groups for --collapse: the project functions on the creating call stack.

def _project_roots() -> Tuple[str, ...]:
    import dali_ipmix
    roots = [Path(dali_ipmix.__file__).resolve().parent]
    try:
        import pipelines
        roots.append(Path(pipelines.__file__).resolve().parent)
    except ImportError:
        pass
    return tuple(str(r) for r in roots)


def _module_functions() -> Dict[str, set]:
    """file -> names of the public module-level functions defined in it (project modules)."""
    roots = _project_roots()
    out = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path or not str(Path(path).resolve()).startswith(roots):
            continue
        out[str(Path(path).resolve())] = {
            name for name, obj in vars(module).items()
            if not name.startswith("_") and callable(obj)
            and getattr(obj, "__module__", None) == module.__name__}
    return out


# An op function of the readable backend ends a group path: ops.py names each image op function
# after its table entry and each mixing function "_" + its table entry.
_OP_FRAMES = {**{name: name for name in C.ALL_IMAGE_OPS}, **{"_" + name: name for name in C.MIXING_OPS}}


def group_path(origin: Sequence[Tuple[str, str]], functions: Dict[str, set]) -> Tuple[str, ...]:
    """The public project functions on the call stack (outermost first, repeats folded), ending at
    the first IPMix op function; private helpers, methods and closures are skipped."""
    path: List[str] = []
    resolved = {}
    for name, file in origin:
        if file not in resolved:
            resolved[file] = str(Path(file).resolve()) if file else ""
        public = functions.get(resolved[file])
        if public is None:
            continue                          # DALI's own frames
        if name in _OP_FRAMES:
            path.append(_OP_FRAMES[name])
            break
        if name in public and (not path or path[-1] != name):
            path.append(name)
    return tuple(path) or ("pipeline",)


def groups(nodes: Sequence[OpNode]) -> Dict[str, Tuple[str, ...]]:
    """operator -> group path.  A split or merge joins the group of its ``if``, i.e. of its
    predicate: DALI creates a split where the value is first used inside the branch, which
    would otherwise put it in whichever op happened to use it first."""
    functions = _module_functions()
    by_name = {n.name: n for n in nodes}
    out = {}
    for n in nodes:
        source = by_name[n.inputs[-1][0]] if conditional_kind(n) else n
        out[n.name] = group_path(source.origin, functions)
    return out


# ---------------------------------------------------------------------------------------------
# DOT.

def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _node_attrs(node: OpNode, output_index: Optional[int]) -> str:
    kind = conditional_kind(node)
    if kind:
        shape = "triangle" if kind == "split" else "invtriangle"
        return f'label={_q(kind)}, shape={shape}, fillcolor="#e0e0e0", fontsize=8, tooltip={_q(node.name)}'
    label = node.call + ("\n" + node.detail if node.detail else "")
    if output_index is not None:
        label += f"\n=> output {output_index}"
    extra = ", peripheries=2" if output_index is not None else ""
    where = " > ".join(f for f, _ in node.origin[-3:])
    return (f"label={_q(label)}, fillcolor={_q(DEVICE_COLORS.get(node.device, '#ffffff'))}, "
            f"tooltip={_q(node.name + (' from ' + where if where else ''))}{extra}")


def _output_index(outputs: Sequence[str]) -> dict:
    """Operator name -> the first pipeline output it feeds."""
    index = {}
    for i, name in enumerate(outputs):
        index.setdefault(name, i)
    return index


def _dot_header(graph_name: str, title: str) -> list:
    return [f"digraph {graph_name} {{",
            f"  graph [label={_q(title)}, labelloc=t, fontname=Helvetica, rankdir=TB];",
            '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=10];',
            "  edge [arrowsize=0.6];"]


def full_dot(nodes: Sequence[OpNode], outputs: Sequence[str], title: str) -> str:
    """One node per operator; argument inputs dashed; pipeline outputs double-bordered."""
    out_index = _output_index(outputs)
    lines = _dot_header("pipeline", title)
    for node in nodes:
        lines.append(f"  {_q(node.name)} [{_node_attrs(node, out_index.get(node.name))}];")
    for node in nodes:
        for src, is_arg in node.inputs:
            lines.append(f"  {_q(src)} -> {_q(node.name)}" + (" [style=dashed];" if is_arg else ";"))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _function_of(node: OpNode, functions: Dict[str, set]) -> str:
    """The innermost project function on the creating call stack."""
    for name, file in reversed(node.origin):
        if file and str(Path(file).resolve()) in functions:
            return name
    return "pipeline"


def conditional_groups(nodes: Sequence[OpNode]) -> Dict[str, str]:
    """split/merge operator -> its group: all the splits of one ``if`` (they share the predicate,
    their argument input) become one node, and so do its merges."""
    return {n.name: f"{conditional_kind(n)}:{n.inputs[-1][0]}" for n in nodes if conditional_kind(n)}


def collapsed_dot(nodes: Sequence[OpNode], outputs: Sequence[str], title: str) -> Tuple[str, int]:
    """The full graph with DALI's split/merge operators folded: one "if" node per ``if`` statement
    (for the values it splits) and one "merge" node (for the values it merges).  Returns the DOT
    text and its node count."""
    cond = conditional_groups(nodes)
    functions = _module_functions()
    by_name = {n.name: n for n in nodes}
    where = lambda name: cond.get(name, name)  # noqa: E731
    members = defaultdict(list)
    for n in nodes:
        if n.name in cond:
            members[cond[n.name]].append(n)
    out_index = _output_index(outputs)
    lines = _dot_header("pipeline_collapsed", title)
    for n in nodes:
        if n.name not in cond:
            lines.append(f"  {_q(n.name)} [{_node_attrs(n, out_index.get(n.name))}];")
    for group, ops in members.items():
        kind, predicate = group.split(":", 1)
        # A split is made where its value is first used inside the branch; the predicate is made
        # where the ``if`` is written.
        where_if = _function_of(by_name[predicate], functions)
        label = (f"if (in {where_if})\nsplits {len(ops)} value(s)" if kind == "split"
                 else f"merge (in {where_if})\n{len(ops)} value(s)")
        shape = "trapezium" if kind == "split" else "invtrapezium"
        lines.append(f'  {_q(group)} [label={_q(label)}, shape={shape}, fillcolor="#e0e0e0", fontsize=8];')
    edges = {}
    for n in nodes:
        for src, is_arg in n.inputs:
            a, b = where(src), where(n.name)
            if a != b:
                edges[(a, b)] = edges.get((a, b), True) and is_arg   # solid if any data edge
    for (a, b), is_arg in edges.items():
        lines.append(f"  {_q(a)} -> {_q(b)}" + (" [style=dashed];" if is_arg else ";"))
    lines.append("}")
    return "\n".join(lines) + "\n", len(nodes) - len(cond) + len(members)


def functions_dot(nodes: Sequence[OpNode], group_of: Dict[str, Tuple[str, ...]], title: str) -> str:
    """One node per creating function (its operator count, top types and split/merge count);
    edges between groups carry how many operator edges they stand for."""
    members = defaultdict(list)
    for node in nodes:
        members[group_of[node.name]].append(node)
    ids = {path: f"g{i}" for i, path in enumerate(members)}
    edges = Counter()
    for node in nodes:
        for src, _ in node.inputs:
            a, b = group_of[src], group_of[node.name]
            if a != b:
                edges[(a, b)] += 1
    lines = [
        "digraph pipeline_functions {",
        f"  graph [label={_q(title)}, labelloc=t, fontname=Helvetica, rankdir=TB];",
        '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=10];',
    ]
    for path, ops in members.items():
        types = Counter(n.type for n in ops if not conditional_kind(n))
        cond = Counter(conditional_kind(n) for n in ops if conditional_kind(n))
        top = ", ".join(f"{t} x{c}" for t, c in types.most_common(3))
        more = len(types) - 3
        label = " > ".join(path[-3:]) + f"\n{len(ops)} operator{'s' if len(ops) > 1 else ''}"
        label += (": " + top if top else "") + (f", +{more} types" if more > 0 else "")
        if cond:
            label += f"\nconditional: {cond.get('split', 0)} split, {cond.get('merge', 0)} merge"
        devices = Counter(n.device for n in ops)
        color = DEVICE_COLORS.get(devices.most_common(1)[0][0], "#ffffff")
        lines.append(f"  {ids[path]} [label={_q(label)}, fillcolor={_q(color)}, "
                     f"tooltip={_q(' > '.join(path))}];")
    for (a, b), count in edges.items():
        width = 1 + math.log10(count)
        lines.append(f"  {ids[a]} -> {ids[b]} [label={_q(str(count))}, penwidth={width:.2f}, fontsize=8];")
    lines.append("}")
    return "\n".join(lines) + "\n"


_DOT_NODE = re.compile(r'^\s*"((?:[^"\\]|\\.)*)"\s*\[', re.M)


def dot_node_names(dot_text: str) -> List[str]:
    """The declared nodes of a DOT file written by ``full_dot`` (one declaration per line)."""
    return [m.group(1).replace('\\"', '"').replace("\\\\", "\\") for m in _DOT_NODE.finditer(dot_text)]


def dali_dot_node_names(dot_text: str) -> set:
    """The nodes of a DOT file written by DALI's ``save_graph_to_dot_file`` (edge lines
    ``a -> b;`` and bare node lines, unquoted names)."""
    names = set()
    for line in dot_text.splitlines():
        line = line.strip().rstrip(";").strip()
        if not line or line.startswith(("digraph", "}", "{")):
            continue
        for part in line.split("->"):
            name = part.split("[")[0].strip().strip('"')
            if name:
                names.add(name)
    return names


def executed_ops(pipe) -> Optional[set]:
    """Operator names of the graph DALI's backend runs (needs a built pipeline; None if it cannot
    be built here, e.g. a GPU pipeline without a GPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dali.dot"
        pipe.save_graph_to_dot_file(str(path))
        return dali_dot_node_names(path.read_text())


# ---------------------------------------------------------------------------------------------
# Rendering.

def render(dot_path: Path, fmt: str, timeout: float, max_nodes: int, node_count: int):
    """Render ``dot_path`` next to itself; returns (image path or None, one-line note)."""
    image = dot_path.with_suffix("." + fmt)
    by_hand = f"dot -T{fmt} {dot_path} -o {image}"
    image.unlink(missing_ok=True)          # never leave an earlier run's picture beside a new DOT
    exe = shutil.which("dot")
    if exe is None:
        return None, (f"no {fmt.upper()}: Graphviz `dot` is not installed (apt-get install graphviz); "
                      f"then run: {by_hand}")
    if node_count > max_nodes:
        return None, (f"no {fmt.upper()} for {dot_path.name}: {node_count} nodes is more than "
                      f"--max-render-nodes {max_nodes} (dot slows down sharply with size); see --collapse, "
                      f"or run: {by_hand}")
    try:
        subprocess.run([exe, f"-T{fmt}", str(dot_path), "-o", str(image)], check=True,
                       capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        image.unlink(missing_ok=True)
        return None, f"no {fmt.upper()}: dot took more than {timeout:g} s (--render-timeout); run: {by_hand}"
    except subprocess.CalledProcessError as e:
        msg = (e.stderr or "").strip().splitlines()
        return None, f"no {fmt.upper()}: dot failed ({msg[-1] if msg else e.returncode}); run: {by_hand}"
    return image, f"wrote {image}"


# ---------------------------------------------------------------------------------------------
# Summary.

def summarize(nodes: Sequence[OpNode], outputs: Sequence[str], executed: Optional[set]) -> dict:
    by_type = Counter((n.type, n.device) for n in nodes)
    cond = Counter(conditional_kind(n) for n in nodes if conditional_kind(n))
    path = longest_path(nodes)
    type_of = {n.name: n.type for n in nodes}
    defined = {n.name for n in nodes}
    out = {
        "operators": len(nodes),
        "edges": sum(len(n.inputs) for n in nodes),
        "by_type_device": [{"type": t, "device": d, "count": c} for (t, d), c in by_type.most_common()],
        "by_device": dict(Counter(n.device for n in nodes)),
        "conditional_split": cond.get("split", 0),
        "conditional_merge": cond.get("merge", 0),
        "longest_path": {"operators": len(path), "names": path, "types": [type_of[p] for p in path],
                         "conditional": sum(type_of[p] in (SPLIT, MERGE) for p in path)},
        "outputs": list(outputs),
    }
    if executed is not None:
        out["executed"] = {
            "operators": len(executed),
            "merged_duplicates": len(defined - executed),
            "added": sorted(executed - defined),
        }
    return out


def _runs(types: Sequence[str]) -> List[str]:
    """Run-length encode a type sequence: a, b, b, b -> a, b x3."""
    out: List[List] = []
    for t in types:
        if out and out[-1][0] == t:
            out[-1][1] += 1
        else:
            out.append([t, 1])
    return [t if c == 1 else f"{t} x{c}" for t, c in out]


def summary_text(summary: dict, title: str, top: int = 25) -> str:
    lines = [f"{title}: {summary['operators']} operators, {summary['edges']} edges "
             f"({', '.join(f'{d} {c}' for d, c in sorted(summary['by_device'].items()))})"]
    lines.append("  operators by type and device:")
    rows = summary["by_type_device"]
    for r in rows[:top]:
        lines.append(f"    {r['count']:6d}  {r['type']:<34s} {r['device']}")
    if len(rows) > top:
        rest = sum(r["count"] for r in rows[top:])
        lines.append(f"    {rest:6d}  ({len(rows) - top} more types)")
    lines.append(f"  conditional nodes: {summary['conditional_split']} split, "
                 f"{summary['conditional_merge']} merge")
    lp = summary["longest_path"]
    runs = _runs(lp["types"])
    shown = " -> ".join(runs if len(runs) <= 14 else runs[:7] + ["..."] + runs[-6:])
    lines.append(f"  longest path: {lp['operators']} operators ({lp['conditional']} of them split/merge): {shown}")
    ex = summary.get("executed")
    if ex is not None:
        lines.append(f"  executed by DALI: {ex['operators']} operators (its graph optimisation merged "
                     f"{ex['merged_duplicates']} identical operators and added {len(ex['added'])}: "
                     f"{', '.join(ex['added']) or 'none'})")
    else:
        lines.append("  executed by DALI: unknown (the pipeline was not built here)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command.

def graph_files(out: Path, fmt: str, collapse: bool, stats: bool = False) -> List[Path]:
    """The files ``graph`` writes into ``out``."""
    names = ["pipeline.dot", f"pipeline.{fmt}", "summary.json", "summary.txt"] + (["memory.txt"] if stats else [])
    if collapse:
        names += [f"pipeline_{kind}.{ext}" for kind in ("collapsed", "functions") for ext in ("dot", fmt)]
    return [out / n for n in names]


def write_graph(pipe, out: Path, title: str, *, fmt: str = "svg", collapse: bool = False,
                render_timeout: float = DEFAULT_RENDER_TIMEOUT,
                max_render_nodes: int = DEFAULT_MAX_RENDER_NODES, build: bool = True,
                log=print) -> dict:
    """Write the DOT file(s), their rendering and the summary of ``pipe`` into ``out``;
    returns the summary (with the written files under "files")."""
    out.mkdir(parents=True, exist_ok=True)
    if build:
        pipe.build()
    nodes = op_nodes(pipe)
    outputs = output_ops(pipe)
    executed = executed_ops(pipe) if build else None
    summary = summarize(nodes, outputs, executed)
    files = {}

    dot_path = out / "pipeline.dot"
    dot_path.write_text(full_dot(nodes, outputs, title))
    files["dot"] = str(dot_path)
    image, note = render(dot_path, fmt, render_timeout, max_render_nodes, len(nodes))
    files[fmt] = str(image) if image else None
    notes = [f"wrote {dot_path} ({len(nodes)} nodes, one per operator)", note]

    if collapse:
        text, n_collapsed = collapsed_dot(nodes, outputs, title + " (split/merge folded per if)")
        cpath = out / "pipeline_collapsed.dot"
        cpath.write_text(text)
        group_of = groups(nodes)
        n_groups = len(set(group_of.values()))
        fpath = out / "pipeline_functions.dot"
        fpath.write_text(functions_dot(nodes, group_of, title + " (grouped by creating function)"))
        summary["collapsed_nodes"] = n_collapsed
        summary["function_groups"] = n_groups
        files["collapsed_dot"], files["functions_dot"] = str(cpath), str(fpath)
        notes.append(f"wrote {cpath} ({n_collapsed} nodes: the {summary['conditional_split']} split and "
                     f"{summary['conditional_merge']} merge operators folded into one node per if)")
        image, note = render(cpath, fmt, render_timeout, max_render_nodes, n_collapsed)
        files[f"collapsed_{fmt}"] = str(image) if image else None
        notes += [note, f"wrote {fpath} ({n_groups} groups)"]
        image, note = render(fpath, fmt, render_timeout, max_render_nodes, n_groups)
        files[f"functions_{fmt}"] = str(image) if image else None
        notes.append(note)

    summary["title"] = title
    summary["files"] = files
    text = summary_text(summary, title)
    (out / "summary.txt").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(text)
    for n in notes:
        log(n)
    log(f"wrote {out / 'summary.txt'}, {out / 'summary.json'}")
    return summary


def _title(args, cfg) -> str:
    return (f"IPMix train pipeline: preset {args.preset}, backend {args.backend}, device {args.device}, "
            f"k={cfg.k} t={cfg.t}, {'jsd' if cfg.jsd else 'no jsd'}, {cfg.image_size} px")


def _run(args) -> int:
    from ._stats import run_with_stats
    cfg = _common.config_from_args(args)
    if (not 0 < args.render_timeout < math.inf or args.max_render_nodes < 1 or args.batch_size < 1
            or args.iters < 1):      # NaN fails the first test too
        raise UserError("--render-timeout, --max-render-nodes, --batch-size and --iters must be positive")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    _common.check_new_files(graph_files(out, args.format, args.collapse, args.stats), args.overwrite,
                            out_dir=out)
    gpu_here = _common.has_gpu()
    if args.stats and args.device == "gpu" and not gpu_here:
        raise UserError("--stats --device gpu: no CUDA GPU here; use --device cpu")
    # A GPU graph can be drawn without a GPU (its Python side); it just cannot be built.
    build = args.device == "cpu" or gpu_here
    with _common.data_folders(args.data, args.mixing, args.seed) as (data, mixing, generated):
        if generated:
            print("graph: no --data/--mixing: using a tiny generated set")
        start = time.perf_counter()
        with _common.pipeline_options(**(_common.STATS_OPTIONS if args.stats else {})):
            pipe = _common.train_pipeline(data, mixing, cfg, args.preset, batch_size=args.batch_size,
                                          device=args.device, backend=args.backend, seed=args.seed)
        if build:
            pipe.build()
        print(f"graph: pipeline defined{' and built' if build else ''} in {time.perf_counter() - start:.1f} s"
              + ("" if build else " (a GPU pipeline cannot be built without a GPU: executed graph unknown)"))
        write_graph(pipe, out, _title(args, cfg), fmt=args.format, collapse=args.collapse,
                    render_timeout=args.render_timeout, max_render_nodes=args.max_render_nodes,
                    build=build)
        if args.stats:
            with _common.bad_files_named(data, mixing, "graph"):   # the batches decode the data
                report = run_with_stats(pipe, iters=args.iters, batch_size=args.batch_size,
                                        device=args.device)
            (out / "memory.txt").write_text(report + "\n")
            print(report)
            print(f"wrote {out / 'memory.txt'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "graph", help="draw the training pipeline graph (DOT + SVG/PNG) with a summary",
        description="Build the training pipeline (on a tiny generated set unless --data/--mixing) and "
                    "write OUT/pipeline.dot (one node per DALI operator), its rendering with Graphviz, "
                    "and a summary: operators by type and device, conditional split/merge nodes, "
                    "the longest path, and the size of the graph DALI executes.")
    _common.add_data_args(p)
    _common.add_config_args(p)
    p.add_argument("--backend", choices=BACKENDS, default="fused",
                   help="IPMix pixel backend: fused (one kernel node, what training uses), dali (the "
                        "readable graph: ~14k operators with the imagenet preset) or none (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=2, help="batch size (default %(default)s; the graph does not depend on it)")
    p.add_argument("--out", default="graph", metavar="DIR", help="output folder (default %(default)s)")
    p.add_argument("--format", choices=FORMATS, default="svg", help="rendering format (default %(default)s)")
    p.add_argument("--collapse", action="store_true",
                   help="also write pipeline_collapsed.dot (DALI's split/merge operators folded into one "
                        "node per `if`) and pipeline_functions.dot (operators grouped by the project "
                        "function that created them: a one-screen overview)")
    p.add_argument("--render-timeout", type=float, default=DEFAULT_RENDER_TIMEOUT,
                   help="seconds dot may take per graph (default %(default)s)")
    p.add_argument("--max-render-nodes", type=int, default=DEFAULT_MAX_RENDER_NODES,
                   help="do not render graphs with more nodes (default %(default)s); the DOT is always written")
    p.add_argument("--stats", action="store_true",
                   help="run a few batches with DALI's executor statistics and print per-operator memory")
    p.add_argument("--iters", type=int, default=3, help="batches run for --stats (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace files of an earlier run in --out")
    p.set_defaults(func=_run)
