#!/usr/bin/env python3
"""Request-lifetime checks for the control plane (docs/contributing.md, "Request lifetimes").

A textual check, so it is deliberately narrow; what it cannot see is left to review and the
sanitizers. In every coroutine of the given files it refuses:

  1. a reference or raw pointer taken from a container (subscript, find, front/back, at,
     ->second, an iterator) and used after a later co_await: another coroutine may erase or
     reallocate the element meanwhile. Copy the value, hold a shared_ptr, or look it up again.
     A binding whose target is known to stay put says why on its line (or the line above) with
     `// stable: REASON`.
  2. a lambda capturing by value, or a conditional (?:), inside a co_await expression, or a
     co_await as a branch of a conditional: GCC 12 destroys such temporaries twice (and with
     a co_await in each branch it corrupted memory). Name the value (the std::function, the
     awaiter) in a local first, or use if/else.
and in the export's request paths (fuse/export_fs.cc):
  3. any access to an export's chain or block status that does not go through its BlockBackend.

Usage: check_lifetimes.py FILE...   (exit 1 and one line per finding if any)
"""

import re
import sys

CONTAINER_ACCESS = re.compile(
    r"\[[^\]]*\]|\bfind(_id)?\(|\.front\(\)|\.back\(\)|\.at\(|(->|\.)second\b|\bbegin\(\)|\*it\b")
BINDING = re.compile(
    r"^\s*(?:const\s+)?(?:[\w:<>,\s]+?|auto)\s*([&*])\s*(\w+)\s*=\s*(.+?);\s*(//.*)?$")
LAMBDA_BY_VALUE = re.compile(r"\[([^\]]*)\]\s*(\([^)]*\))?\s*(->\s*[\w:<>]+\s*)?\{")
CHAIN_ACCESS = re.compile(r"(\bchain\.(top|layers)\b|(?<![>.])\bblock_status_above\()")


FUNCTION_START = re.compile(r"\)[^;{}]*\{\s*$")
NOT_A_FUNCTION = re.compile(r"^\s*(namespace|struct|class|union|enum|if|for|while|switch|do|else)\b")


def functions(lines):
    """Yields (start, end) line ranges of function bodies that are not inside another one."""
    depth = 0
    start = None  # (line, depth at which the body opened)
    for i, line in enumerate(lines):
        code = strip_comment(line)
        opens = start is None and FUNCTION_START.search(code) and not NOT_A_FUNCTION.match(code)
        for ch in code:
            if ch == "{":
                depth += 1
            elif ch == "}":
                if start is not None and depth == start[1]:
                    yield start[0], i
                    start = None
                depth -= 1
        if opens and start is None:
            start = (i, depth)


def strip_comment(line):
    pos = line.find("//")
    return line if pos < 0 else line[:pos]


def stable(lines, i):
    return "// stable:" in lines[i] or (i > 0 and lines[i - 1].strip().startswith("// stable:"))


def check_bindings(path, lines, start, end, out):
    body = lines[start:end + 1]
    if not any("co_await" in strip_comment(l) for l in body):
        return
    for k, line in enumerate(body):
        m = BINDING.match(strip_comment(line))
        if not m or not CONTAINER_ACCESS.search(m.group(3)) or "co_await" in m.group(3):
            continue
        if stable(lines, start + k):
            continue
        name = m.group(2)
        awaited = False
        for j in range(k + 1, len(body)):
            code = strip_comment(body[j])
            if re.search(r"\b" + re.escape(name) + r"\b", code) and awaited:
                out.append(f"{path}:{start + k + 1}: '{name}' points into a container and is "
                           f"used after a co_await (line {start + j + 1}); copy it, hold a "
                           f"shared_ptr, look it up again, or say why it is stable")
                break
            if "co_await" in code:
                awaited = True


def statement_from(lines, i):
    """The statement starting on line i, up to its ';' outside any parentheses or braces."""
    depth = 0
    text = ""
    for j in range(i, min(i + 40, len(lines))):
        for ch in strip_comment(lines[j]):
            if ch == "{" and depth == 0 and text.rstrip().endswith(")"):
                return text  # the body of an if/for/while: the expression ended before it
            text += ch
            if ch in "({":
                depth += 1
            elif ch in ")}":
                depth -= 1
            elif ch == ";" and depth <= 0:
                return text
        text += " "
    return text


def check_lambdas(path, lines, out):
    for i, line in enumerate(lines):
        code = strip_comment(line)
        if "co_await" not in code:
            continue
        stmt = statement_from(lines, i)
        awaited = stmt[stmt.find("co_await"):]
        # A conditional inside a lambda's body runs later, not in the expression.
        outside = re.sub(r"\{[^{}]*\}", "", awaited).replace("::", "")
        before = re.sub(r'"(\\.|[^"\\])*"', '""', stmt[:stmt.find("co_await")])
        before = re.sub(r"\{[^{}]*\}", "", before).replace("::", "")
        if re.search(r"\?[^:;]*:", outside) or "?" in before:
            out.append(f"{path}:{i + 1}: a conditional (?:) in a co_await expression (GCC 12 "
                       f"destroys its temporary twice); name the value first")
        for m in LAMBDA_BY_VALUE.finditer(awaited):
            captures = [c.strip() for c in m.group(1).split(",") if c.strip()]
            by_value = [c for c in captures if c != "this" and not c.startswith("&")]
            if by_value:
                out.append(f"{path}:{i + 1}: lambda capturing by value ({', '.join(by_value)}) "
                           f"in a co_await expression (GCC 12 destroys it twice); name it first")


def check_chain_access(path, lines, out):
    if not path.endswith("fuse/export_fs.cc"):
        return
    for i, line in enumerate(lines):
        if CHAIN_ACCESS.search(strip_comment(line)):
            out.append(f"{path}:{i + 1}: the export's chain is reached past its BlockBackend "
                       f"(requests must go through the backend so drained sections hold them)")


def main(paths):
    out = []
    for path in paths:
        with open(path) as f:
            lines = f.read().split("\n")
        for start, end in functions(lines):
            check_bindings(path, lines, start, end, out)
        check_lambdas(path, lines, out)
        check_chain_access(path, lines, out)
    for o in out:
        print(o)
    return 1 if out else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
