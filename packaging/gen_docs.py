#!/usr/bin/env python3
"""Makes the man pages and the bash completion from the built binary's --help texts.

The --help texts in fuse/*.cc are the one source of every command's synopsis, description and
options. This script runs `imgfs --help`, `imgfs COMMAND --help` for each command that lists,
and `mount.imgfs --help`, and writes:

  man1/imgfs.1          every command, plus the man-only sections of packaging/man/imgfs.txt
  man1/imgfs-CMD.1      one page per command
  man8/mount.imgfs.8    the mount(8) helper, plus packaging/man/mount.imgfs.txt
  man8/mount.fuse.imgfs.8   a link to it
  completion/imgfs      bash completion: packaging/imgfs.bash-completion with the commands, their
                        options and their argument kinds filled in

The help text format it reads (and that a new command's --help should keep):
  usage: imgfs CMD ARGS        first line; more synopsis lines may follow ("   or: imgfs ...")
  <blank>
  text paragraphs              unindented lines
    TERM    DESCRIPTION        indented lists; a deeper line that starts under DESCRIPTION
                               continues it, any other deeper line is a nested list
Man-only text files use the same format, with "== SECTION" lines starting sections,
"=== Subsection" lines starting subsections, and lines between two ``` lines shown as they are.

Usage: gen_docs.py --imgfs BIN --version V --source-dir DIR --out DIR
"""

import argparse
import gzip
import os
import re
import subprocess
import sys

PROG = "imgfs"


def fail(msg):
    sys.exit(f"gen_docs.py: {msg}")


def run_help(binary, args, argv0=None):
    cmd = [argv0 or binary] + args
    # A sanitizer build's binary: this is no leak check, and a report would fail the build.
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    r = subprocess.run(cmd, executable=binary, capture_output=True, text=True, timeout=60, env=env)
    if r.returncode != 0 or not r.stdout.strip():
        fail(f"'{' '.join(cmd)}' exited {r.returncode} without a help text "
             f"(every command needs --help): {r.stderr.strip()}")
    return r.stdout.rstrip("\n")


# ---------------------------------------------------------------------------------------------
# Help text parsing


def indent_of(line):
    return len(line) - len(line.lstrip(" "))


def split_term(text):
    """'TERM   DESCRIPTION' -> (TERM, DESCRIPTION, column of DESCRIPTION in text) or None."""
    m = re.match(r"(\S(?:.*?\S)?)( {2,})(\S.*)$", text)
    if not m:
        return None
    return m.group(1), m.group(3), len(m.group(1)) + len(m.group(2))


def parse_list(lines):
    """Indented lines -> list of items: ('item', term, [desc lines], children) or ('text', line)."""
    base = indent_of(lines[0])
    items = []
    i = 0
    while i < len(lines):
        line = lines[i]
        ind = indent_of(line)
        text = line.strip()
        if ind > base and items and items[-1][0] == "item":
            # Deeper: a continuation if it starts under the description, else a nested list.
            item = items[-1]
            if item[4] is not None and ind == base + item[4]:
                item[2].append(text)
                i += 1
                continue
            j = i
            while j < len(lines) and indent_of(lines[j]) > base:
                j += 1
            item[3].extend(parse_list(lines[i:j]))
            i = j
            continue
        parts = split_term(text)
        column = next((it[4] for it in reversed(items) if it[0] == "item" and it[4]), None)
        if not parts and column and len(text) > column and text[column - 1] == " " \
                and text[column] != " ":
            # One space only between TERM and DESCRIPTION, but DESCRIPTION starts in the
            # column the others do.
            parts = (text[:column].strip(), text[column:], column)
        if parts:
            items.append(["item", parts[0], [parts[1]], [], parts[2]])
        elif len(text.split()) >= 5:
            items.append(["text", text])  # a sentence in the list, not a term
        else:
            items.append(["item", text, [], [], None])
        i += 1
    return items


def parse_body(lines):
    """Lines -> blocks: ('para', [lines]), ('list', items) or ('literal', [lines]) for the lines
    between two ``` lines (examples, shown as they are)."""
    blocks = []
    run = []
    run_kind = None

    def flush():
        nonlocal run, run_kind
        if run:
            if run_kind == "para":
                blocks.append(("para", [l.strip() for l in run]))
            else:
                blocks.append(("list", parse_list(run)))
        run, run_kind = [], None

    literal = None
    for line in lines:
        if line.strip() == "```":
            if literal is None:
                flush()
                literal = []
            else:
                blocks.append(("literal", literal))
                literal = None
            continue
        if literal is not None:
            literal.append(line)
            continue
        if not line.strip():
            flush()
            blocks.append(("break", None))
            continue
        kind = "list" if line.startswith(" ") else "para"
        if kind != run_kind:
            flush()
            run_kind = kind
        run.append(line)
    flush()
    return blocks


def parse_help(text):
    """A command's --help -> (synopsis lines without 'usage:', body blocks)."""
    lines = text.split("\n")
    synopsis = []
    i = 0
    while i < len(lines) and lines[i].strip():
        s = re.sub(r"^\s*(usage|or):\s*", "", lines[i].strip(), flags=re.I)
        synopsis.append(s)
        i += 1
    return synopsis, parse_body(lines[i:])


def parse_commands(top_help):
    """`imgfs --help` -> ([(command, synopsis, summary)], every synopsis line) from its
    indented command list (a command may have several lines, one per form)."""
    commands = []
    synopses = []
    for line in top_help.split("\n"):
        if not line.startswith("  ") or line.startswith("   "):
            continue
        parts = split_term(line.strip())
        if not parts:
            continue
        synopsis, summary = parts[0], parts[1]
        name = synopsis.split()[0]
        if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
            continue
        if any(c[0] == name for c in commands):
            # Another form of the same command: one entry with both summaries.
            i = next(i for i, c in enumerate(commands) if c[0] == name)
            commands[i] = (name, commands[i][1], commands[i][2] + "; " + summary)
        else:
            commands.append((name, synopsis, summary))
        synopses.append(synopsis)
    if not commands:
        fail("no commands found in 'imgfs --help'")
    return commands, synopses


def parse_extra(path):
    """A man-only text file -> [(level, title, body lines)]; level 1 = section, 2 = subsection."""
    sections = []
    literal = False
    with open(path, encoding="utf-8") as f:
        for line in f.read().split("\n"):
            if line.strip() == "```":
                literal = not literal
            elif not literal and line.startswith("#"):
                continue  # a comment for whoever edits the file
            m = None if literal else re.match(r"(={2,3}) (.+)$", line)
            if m:
                sections.append((len(m.group(1)) - 1, m.group(2).strip(), []))
            elif sections:
                sections[-1][2].append(line)
            elif line.strip():
                fail(f"{path}: text before the first '== SECTION' line")
    return sections


# ---------------------------------------------------------------------------------------------
# roff


def esc(text):
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return text


def line_safe(text):
    """Escapes one output line; a leading . or ' would be read as a request."""
    text = esc(text)
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def roff_items(items, out):
    for item in items:
        if item[0] == "text":
            out.append(".PP")  # at the list's indentation, not under the previous item
            out.append(line_safe(item[1]))
            continue
        _, term, desc, children, _ = item
        out.append(".TP")
        out.append(f"\\fB{esc(term)}\\fR")
        out.extend(line_safe(d) for d in desc)
        if children:
            out.append(".RS")
            roff_items(children, out)
            out.append(".RE")


def roff_blocks(blocks, out):
    pending_para = True
    for kind, content in blocks:
        if kind == "break":
            pending_para = True
            continue
        if kind == "para":
            out.append(".PP" if pending_para else ".br")
            out.extend(line_safe(l) for l in content)
        elif kind == "literal":
            out += [".PP", ".RS 4", ".nf"]
            out.extend(line_safe(l) if l.strip() else "" for l in content)
            out += [".fi", ".RE"]
        else:
            out.append(".RS")
            roff_items(content, out)
            out.append(".RE")
        pending_para = kind != "para"


def roff_args(text):
    """Synopsis arguments: placeholders (FILE, MOUNTPOINT, ...) in italics."""
    return re.sub(r"\b([A-Z][A-Z0-9_]+)\b", r"\\fI\1\\fR", esc(text))


def roff_synopsis(lines, out):
    for i, s in enumerate(lines):
        words = s.split()
        n = 2 if len(words) > 1 and words[0] == PROG and re.fullmatch(r"[a-z][a-z0-9-]*",
                                                                      words[1]) else 1
        if i:
            out.append(".br")
        out.append(f"\\fB{esc(' '.join(words[:n]))}\\fR {roff_args(' '.join(words[n:]))}".rstrip())


def roff_extra(sections, out):
    for level, title, body in sections:
        out.append((".SH " if level == 1 else ".SS ") + '"' + esc(title.upper() if level == 1
                                                                    else title) + '"')
        roff_blocks(parse_body(body), out)


def th(name, section, version, date):
    return (f'.TH "{esc(name.upper())}" "{section}" "{date}" "{PROG} {esc(version)}" '
            f'"{"User Commands" if section == "1" else "System Administration"}"')


def write_page(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = ("\n".join(lines) + "\n").encode("utf-8")
    # mtime 0 and no file name inside: the same input makes the same bytes.
    with open(path + ".gz", "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as z:
            z.write(data)


def header_comment():
    return ['.\\" Generated by packaging/gen_docs.py from the --help texts in fuse/*.cc and',
            '.\\" packaging/man/*.txt; edit those, not this file.']


# ---------------------------------------------------------------------------------------------
# Bash completion data


def usage_words(synopsis):
    """'imgfs commit MNT NAME [--base FILE] [--wait]' -> tokens after the command name."""
    words = re.findall(r"\[|\]|\.\.\.|[^\s\[\]]+", synopsis)
    # Drop 'imgfs CMD' (or 'mount.imgfs').
    if words and words[0] == PROG:
        words = words[2:]
    elif words:
        words = words[1:]
    return words


def completion_spec(synopses, items):
    """-> (options, {option taking a value: its placeholder}, positional placeholders,
    {option: its choices})."""
    options, with_value, positional, values = [], {}, [], {}
    for n, synopsis in enumerate(synopses):
        words = usage_words(synopsis)
        i = 0
        last = None  # what a following "..." repeats: "positional" or "option"
        while i < len(words):
            w = words[i]
            if w in ("[", "]", "..."):
                if w == "..." and last == "positional" and not positional[-1].endswith("..."):
                    positional[-1] += "..."
                i += 1
                continue
            last = "option"
            if re.fullmatch(r"--?[A-Za-z][\w-]*(=\S*)?", w):
                opt = w.split("=")[0]
                if opt not in options:
                    options.append(opt)
                nxt = words[i + 1] if i + 1 < len(words) else ""
                if nxt and nxt not in ("[", "]", "...") and not nxt.startswith("-"):
                    with_value.setdefault(opt, nxt)
                    if "|" in nxt:
                        values[opt] = nxt.split("|")
                    i += 1
                i += 1
                continue
            if n == 0:  # later synopsis lines are other forms; their options still count
                positional.append(w)
                last = "positional"
            i += 1
    # Choices of an option whose list item has a nested list (mount's -o: ro, allow_other, ...).
    for item in items:
        if item[0] != "item" or not item[3]:
            continue
        opt = item[1].split()[0]
        if opt in with_value:
            vals = []
            for child in item[3]:
                if child[0] == "item":
                    v = child[1].split()[0].rstrip(",")
                    v = v.split("=")[0] + "=" if "=" in v else v
                    if re.fullmatch(r"[\w.-]+=?", v):
                        vals.append(v)
            if vals:
                values[opt] = vals
    if "--help" not in options:
        options.append("--help")
    return options, with_value, positional, values


def bash_quote(words):
    return "'" + " ".join(words).replace("'", "'\\''") + "'"


def completion_case(commands, specs):
    out = []
    out.append(f"    commands={bash_quote([c[0] for c in commands])}")
    out.append('    case "$1" in')
    for name, (options, with_value, positional, values) in specs.items():
        out.append(f"    {name})")
        out.append(f"        options={bash_quote(options)}")
        out.append(f"        args={bash_quote(positional)}")
        for opt, placeholder in with_value.items():
            out.append(f"        optarg[{opt}]={bash_quote([placeholder])}")
        for opt, vals in values.items():
            out.append(f"        choices[{opt}]={bash_quote(vals)}")
        out.append("        ;;")
    out.append("    esac")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--imgfs", required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    date = ""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        import time
        date = time.strftime("%Y-%m-%d", time.gmtime(int(os.environ["SOURCE_DATE_EPOCH"])))
    pkg = os.path.join(a.source_dir, "packaging")

    top = run_help(a.imgfs, ["--help"])
    commands, top_synopses = parse_commands(top)
    helps = {name: parse_help(run_help(a.imgfs, [name, "--help"])) for name, _, _ in commands}
    extra = parse_extra(os.path.join(pkg, "man", "imgfs.txt"))
    name_line = next((b for lvl, t, b in extra if t.upper() == "NAME"), None)
    if not name_line:
        fail("packaging/man/imgfs.txt needs a '== NAME' section")
    summary = " ".join(l.strip() for l in name_line if l.strip())

    # imgfs(1): the overview, every command in full, then the man-only sections.
    page = header_comment() + [th(PROG, "1", a.version, date), ".SH NAME",
                               f"{PROG} \\- {esc(summary)}", ".SH SYNOPSIS"]
    for synopsis in top_synopses:
        roff_synopsis([f"{PROG} {synopsis}"], page)
        page.append(".br")
    roff_synopsis([f"{PROG} --version | --help"], page)
    rest = [s for s in extra if s[1].upper() != "NAME"]
    desc = [s for s in rest if s[1].upper() == "DESCRIPTION"]
    roff_extra(desc, page)
    page.append('.SH "COMMANDS"')
    page.append(".PP")
    page.append(f"Each command also prints its part of this page with \\fB{PROG} \\fICOMMAND\\fB "
                f"\\-\\-help\\fR, and has a page of its own, \\fB{PROG}\\-\\fICOMMAND\\fR(1).")
    for name, synopsis, summary_c in commands:
        syn, body = helps[name]
        page.append(f'.SS "{esc(name)}"')
        page.append(".PP")
        page.append(f"\\fI{esc(summary_c)}\\fR")
        page.append(".PP")
        roff_synopsis(syn, page)
        roff_blocks(body, page)
    for level, title, body in rest:
        if title.upper() == "SEE ALSO":
            body.insert(0, ", ".join(f"{PROG}-{name}(1)" for name, _, _ in commands) + ",")
    roff_extra([s for s in rest if s[1].upper() != "DESCRIPTION"], page)
    write_page(os.path.join(a.out, "man1", f"{PROG}.1"), page)

    # imgfs-CMD(1)
    for name, synopsis, summary_c in commands:
        syn, body = helps[name]
        page = header_comment() + [th(f"{PROG}-{name}", "1", a.version, date), ".SH NAME",
                                   f"{PROG}\\-{esc(name)} \\- {esc(summary_c)}", ".SH SYNOPSIS"]
        roff_synopsis(syn, page)
        page.append(".SH DESCRIPTION")
        if not any(k != "break" for k, _ in body):
            page.append(".PP")
            page.append(esc(summary_c[0].upper() + summary_c[1:]) + ".")
        roff_blocks(body, page)
        page += [".SH SEE ALSO", f".BR {PROG} (1)" + ("," if name == "mount" else "")]
        if name == "mount":
            page.append(".BR mount.imgfs (8)")
        write_page(os.path.join(a.out, "man1", f"{PROG}-{name}.1"), page)

    # mount.imgfs(8) and its alias.
    syn, body = parse_help(run_help(a.imgfs, ["--help"], argv0="mount.imgfs"))
    page = header_comment() + [th("mount.imgfs", "8", a.version, date), ".SH NAME",
                               "mount.imgfs, mount.fuse.imgfs \\- mount helper for imgfs image "
                               "directories", ".SH SYNOPSIS"]
    roff_synopsis(syn, page)
    page.append(".SH DESCRIPTION")
    roff_blocks(body, page)
    roff_extra(parse_extra(os.path.join(pkg, "man", "mount.imgfs.txt")), page)
    write_page(os.path.join(a.out, "man8", "mount.imgfs.8"), page)
    write_page(os.path.join(a.out, "man8", "mount.fuse.imgfs.8"), [".so man8/mount.imgfs.8"])

    # Bash completion.
    specs = {}
    for name, synopsis, _ in commands:
        syn, body = helps[name]
        items = [it for kind, blk in body if kind == "list" for it in blk]
        specs[name] = completion_spec(syn, items)
    with open(os.path.join(pkg, "imgfs.bash-completion"), encoding="utf-8") as f:
        template = f.read()
    marker = "    # @COMMANDS@\n"
    if marker not in template:
        fail("packaging/imgfs.bash-completion has no '# @COMMANDS@' line")
    os.makedirs(os.path.join(a.out, "completion"), exist_ok=True)
    with open(os.path.join(a.out, "completion", PROG), "w", encoding="utf-8") as f:
        f.write(template.replace(marker, completion_case(commands, specs) + "\n"))


if __name__ == "__main__":
    main()
