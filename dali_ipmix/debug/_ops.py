"""The operators of a DALI pipeline as plain records (``OpNode``): what ``dali-ipmix graph`` draws
and what ``--stats`` names its memory rows by (docs/debugging.md)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Tuple


@dataclass(frozen=True)
class OpNode:
    name: str                         # DALI's instance name (unique in the pipeline)
    type: str                         # schema, e.g. "decoders.ImageRandomCrop", "conditional.Split"
    call: str                         # the Python call, e.g. "fn.decoders.image_random_crop", "math.sub"
    device: str                       # cpu | gpu | mixed
    inputs: Tuple[Tuple[str, bool], ...]   # (producing operator, is an argument input)
    origin: Tuple[Tuple[str, str], ...]    # (function, file) of the creating call stack, outermost first
    detail: str = ""                  # e.g. the arithmetic expression


_SPEC_LINE = re.compile(r"^\s*(\w+): (.*)$", re.M)


def _spec_fields(spec_text: str) -> Dict[str, str]:
    return {m.group(1): m.group(2).strip() for m in _SPEC_LINE.finditer(spec_text)}


def _spec_list(value: str) -> List[str]:
    # OpSpec prints lists as "[a, b, c, ]"
    return [v.strip() for v in value.strip("[]").split(",") if v.strip()]


# DALI's batch-level Python operator is registered for jax_function; the fused backend uses it too
_SCHEMA_ALIASES = {"_JaxFunction": "BatchPythonFunction"}


def _type_name(schema: str) -> str:
    return _SCHEMA_ALIASES.get(schema) or schema.lstrip("_").replace("__", ".")


def defined_ops(pipe) -> list:
    """The DALI operator instances of a pipeline, inputs first.  Only the Python side of the
    graph is needed, so a GPU pipeline can be inspected on a machine without a GPU."""
    if getattr(pipe, "_ops", None) is None:
        pipe._build_graph()
    return list(pipe._ops)


def op_nodes(pipe) -> List[OpNode]:
    nodes = []
    for op in defined_ops(pipe):
        fields = _spec_fields(str(op.spec))
        regular = op.spec.NumRegularInput()
        inputs = tuple((edge.source.name, i >= regular) for i, edge in enumerate(op.inputs))
        names = _spec_list(fields.get("_origin_stack_name", "[]"))
        files = _spec_list(fields.get("_origin_stack_filename", "[]"))
        if len(files) != len(names):      # a comma in a path: keep the names alone
            files = [""] * len(names)
        schema = getattr(op._op, "schema_name", type(op._op).__name__)
        module = fields.get("_module", "nvidia.dali.fn").replace("nvidia.dali.", "")
        call = f"{module}.{fields.get('_display_name', schema)}"
        nodes.append(OpNode(name=op.name, type=_type_name(schema), call=call,
                            device=fields.get("device", getattr(op._op, "device", "cpu")), inputs=inputs,
                            origin=tuple(zip(names, files)),
                            detail=fields.get("expression_desc", "")))
    return nodes
