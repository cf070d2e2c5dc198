"""Reading suite files with bounded resources.

A suite file is untrusted text: a 1 KB YAML alias bomb expands to billions of nodes, a
10 000-deep ``[[[[...`` exhausts the recursion limit, a 100 MB scalar or an integer of
100 000 digits stalls the parser, and a duplicate key silently drops a setting. This
module parses YAML with ``yaml.SafeLoader`` under explicit limits and raises
:class:`LoadError` (its ``problem`` is one bounded line) for each; ``spec.load_suite``
turns it into a ``SuiteError``. No message ever embeds more than :data:`SNIPPET` characters
of the input.
"""

from __future__ import annotations

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

#: A suite file larger than this is not a suite (the largest shipped one is ~5 KB).
MAX_BYTES = 1_000_000
#: Nesting deeper than this is not a suite (real suites nest < 8 levels).
MAX_DEPTH = 64
#: One scalar (a string, a number) longer than this is refused.
MAX_SCALAR = 10_000
#: Nodes after expanding every alias: a suite with a few hundred fields is far below.
MAX_NODES = 100_000
#: How much of any input value an error message may quote.
SNIPPET = 80


class LoadError(ValueError):
    """A suite file refused before validation; ``problem`` says why in one bounded line."""

    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(problem)


def snippet(value: object, limit: int = SNIPPET) -> str:
    """``repr(value)`` cut to ``limit`` characters, so messages never grow with the input."""
    if isinstance(value, int) and value.bit_length() > 4 * limit:  # repr() of a huge int is slow or refused
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = repr(value) if not isinstance(value, str) else repr(value[: limit + 1])
        size = len(value) if isinstance(value, str) else len(text)
    except (ValueError, RecursionError):
        return f"<a {type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[:limit] + f"... ({size} characters)"


def unprintable(text: str) -> list[str]:
    """The characters of ``text`` a terminal or a Markdown page would not show as themselves
    (controls, NUL, escape codes, zero-width and bidirectional format characters, unusual
    spaces: everything ``str.isprintable`` refuses), as ``U+XXXX``, each once."""
    return list(dict.fromkeys(f"U+{ord(c):04X}" for c in text if not c.isprintable()))


def printable(text: str, keep: str = "\n\t") -> str:
    """``text`` with every character :func:`unprintable` names written as its Python escape
    (``\\x1b``, ``\\u202e``), except those in ``keep``: what kdbench prints (terminal,
    Markdown, LaTeX, HTML) can then neither drive the terminal nor hide or reorder text."""
    if text.isprintable():
        return text
    # line by line: a report page is megabytes of printable lines (figures in base64)
    return "\n".join(line if line.isprintable() else "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in line)
                     for line in text.split("\n")) if "\n" in keep else "".join(
        c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a later key silently replacing an earlier one)."""

    def construct_mapping(self, node: MappingNode, deep: bool = False):  # type: ignore[override]
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeConstructor names it below
                continue
            if duplicate:
                mark = key_node.start_mark
                raise LoadError(f"line {mark.line + 1}: duplicate key {snippet(key)} (a later value would silently replace the earlier one)")
        return super().construct_mapping(node, deep=deep)


def _check_events(text: str) -> None:
    """Depth and scalar size, from the event stream (no recursion, no expansion)."""
    depth = 0
    for event in yaml.parse(text, yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise LoadError(f"line {event.start_mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
        elif isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_SCALAR:
            raise LoadError(f"line {event.start_mark.line + 1}: a value of {len(event.value)} characters "
                            f"(at most {MAX_SCALAR}): {snippet(event.value)}")


def _expanded_size(root: Node) -> int:
    """Nodes the document has once every alias is expanded; refuses recursive aliases and
    stops counting at :data:`MAX_NODES` (so a bomb costs microseconds, not memory)."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise LoadError(f"line {node.start_mark.line + 1}: an alias refers to a node that contains it (recursive structure)")
        on_path.add(key)
        total = 1
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                raise LoadError(f"aliases expand to more than {MAX_NODES} values (an alias bomb?); write the suite out without them")
        on_path.discard(key)
        sizes[key] = total
        return total

    return size(root)


def parse_yaml(raw: bytes | str) -> object:
    """Parse one YAML document under the limits above. Raises :class:`LoadError`."""
    if len(raw) > MAX_BYTES:
        raise LoadError(f"the file has {len(raw)} bytes; a suite has at most {MAX_BYTES}")
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LoadError(f"not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 4]!r}); save the file as UTF-8") from None
    else:
        text = raw
    text = text.removeprefix("\ufeff")
    try:
        _check_events(text)
        loader = _BoundedLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _expanded_size(node)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except LoadError:
        raise
    except yaml.YAMLError as exc:
        raise LoadError(f"not valid YAML: {_bounded_yaml_error(exc)}") from None
    except (ValueError, OverflowError, RecursionError) as exc:  # int('9' * 5000), a float too large
        raise LoadError(f"a value YAML cannot convert: {snippet(str(exc), 200)}") from None


def _bounded_yaml_error(exc: yaml.YAMLError) -> str:
    """PyYAML's message without its source snippet (which quotes the whole line)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        parts = [exc.context, exc.problem]
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return where + "; ".join(snippet(p, 200).strip("'\"") for p in parts if p)
    return snippet(str(exc), 200)
