"""The README and docs/ stay true to the repository: every relative link resolves (the file exists, and an
``#anchor`` names a heading of the target, by GitHub's slug rules), every ``diffusion-trak <command> --flag`` in
their code blocks exists in the CLI's parser, and every name a Python block imports from diffusion_trak (and
every keyword it gives the settings dataclasses and the Attributor) exists. Fast: nothing is run."""
import ast
import glob
import importlib
import inspect
import os
import re
import shlex
from urllib.parse import unquote

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
#: other pages whose links must resolve too (they link into the README and docs/)
LINKED = PAGES + [os.path.join(ROOT, "evaluations", "README.md")]
FENCE = re.compile(r"^(```+|~~~+)([^\n]*)\n(.*?)^\1[ \t]*$", re.S | re.M)


def rel(path):
    return os.path.relpath(path, ROOT)


def code_blocks(text):
    """``(language, body)`` of every fenced code block."""
    return [(m.group(2).strip().split(" ")[0].lower(), m.group(3)) for m in FENCE.finditer(text)]


def prose(text):
    """The text outside fenced code blocks and inline code spans (links there are not links)."""
    text = FENCE.sub("", text)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text, flags=re.S)


def slug(heading):
    """GitHub's anchor of a heading: inline markup reduced to its text, lower case, punctuation other than
    ``-`` and ``_`` dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """Every heading anchor of a Markdown file, duplicates numbered as GitHub numbers them."""
    seen, out = {}, set()
    for line in FENCE.sub("", open(path, encoding="utf-8").read()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def dead_links(path):
    """The relative links of a Markdown file that do not resolve: ``[(target, why), ...]``."""
    dead = []
    for target in LINK.findall(prose(open(path, encoding="utf-8").read())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), unquote(file_part))) if file_part else path
        if not os.path.exists(dest):
            dead.append((target, "no such file"))
        elif anchor and dest.endswith(".md") and unquote(anchor).lower() not in anchors(dest):
            dead.append((target, f"no heading #{anchor} in {rel(dest)}"))
    return dead


@pytest.mark.parametrize("page", LINKED, ids=rel)
def test_every_relative_link_resolves(page):
    assert dead_links(page) == []


def test_the_readme_links_every_docs_page():
    readme = open(PAGES[0], encoding="utf-8").read()
    linked = {os.path.normpath(t.partition("#")[0]) for t in LINK.findall(prose(readme))}
    missing = [rel(p) for p in PAGES[1:] if rel(p) not in linked]
    assert missing == [], f"docs pages the README does not link: {missing}"


def test_the_link_check_finds_dead_links(tmp_path):
    (tmp_path / "other.md").write_text("# A heading: with `code`, punctuation!\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md) [ok](other.md#a-heading-with-code-punctuation) [ok](other.md#twice-1) "
                    "[ok](#here) [web](https://example.org/x) `[code](nowhere.md)`\n\n# Here\n\n"
                    "[gone](missing.md) [bad anchor](other.md#nope) ![img](missing.png) [self](#nowhere)\n")
    assert [t for t, _ in dead_links(str(page))] == ["missing.md", "other.md#nope", "missing.png", "#nowhere"]


# ---------------------------------------------------------------- the code blocks

def cli_commands():
    """``(page, argv after the program name)`` of every diffusion-trak invocation in a shell block: ``diffusion-trak``,
    ``python -m diffusion_trak`` and ``accelerate launch ... -m diffusion_trak``."""
    found = []
    for page in PAGES:
        for lang, body in code_blocks(open(page, encoding="utf-8").read()):
            if lang not in ("bash", "sh", "shell", "console", ""):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                try:
                    tokens = shlex.split(line, comments=True)
                except ValueError:
                    continue
                for i, tok in enumerate(tokens):
                    if tok == "diffusion-trak" or (tok == "diffusion_trak" and i > 0 and tokens[i - 1] == "-m"):
                        argv = []
                        for t in tokens[i + 1:]:
                            if t in ("&&", "||", "|", ";", ">", "2>", ">>"):
                                break
                            argv.append(t)
                        found.append((rel(page), argv))
                        break
    return found


def test_the_docs_run_diffusion_trak_commands():
    commands = cli_commands()
    assert len(commands) > 20
    assert any(p == "README.md" and argv[:1] == ["demo"] for p, argv in commands)


def test_every_cli_command_and_flag_in_the_docs_exists():
    from diffusion_trak.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    wrong = []
    for page, argv in cli_commands():
        if not argv or argv[0] in ("-h", "--help"):
            continue
        if argv[0] not in sub:
            wrong.append(f"{page}: diffusion-trak {argv[0]} (no such command)")
            continue
        options = sub[argv[0]]._option_string_actions
        for tok in argv[1:]:
            if tok.startswith("-") and not re.match(r"^-\d", tok):
                flag = tok.split("=", 1)[0]
                if flag not in options:
                    wrong.append(f"{page}: diffusion-trak {argv[0]} {flag}")
    assert wrong == []


def python_blocks():
    out = []
    for page in PAGES:
        for lang, body in code_blocks(open(page, encoding="utf-8").read()):
            if lang in ("python", "py"):
                out.append((rel(page), ast.parse(body, filename=rel(page))))
    return out


def _import(module, name):
    mod = importlib.import_module(module)
    if hasattr(mod, name):
        return getattr(mod, name)
    return importlib.import_module(f"{module}.{name}")  # a submodule: from diffusion_trak import latent


def test_every_name_the_python_blocks_import_from_diffusion_trak_imports():
    blocks = python_blocks()
    assert any(p == "README.md" for p, _ in blocks)
    wrong = []
    for page, tree in blocks:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "diffusion_trak":
                for alias in node.names:
                    try:
                        _import(node.module, alias.name)
                    except ImportError as e:
                        wrong.append(f"{page}: from {node.module} import {alias.name} ({e})")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "diffusion_trak":
                        try:
                            importlib.import_module(alias.name)
                        except ImportError as e:
                            wrong.append(f"{page}: import {alias.name} ({e})")
    assert wrong == []


def _accepts(func, keyword):
    params = inspect.signature(func).parameters
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def test_the_python_blocks_call_what_exists():
    """The settings dataclasses and the Attributor, as the blocks call them: keywords they take, methods they have."""
    from diffusion_trak import Attributor
    from diffusion_trak.config import FeaturizeArgs, ScoreArgs
    from diffusion_trak.data import DataArgs

    callables = {"FeaturizeArgs": FeaturizeArgs, "ScoreArgs": ScoreArgs, "DataArgs": DataArgs, "Attributor": Attributor,
                 "Attributor.from_pretrained": Attributor.from_pretrained,
                 "Attributor.from_pipeline": Attributor.from_pipeline}
    wrong = []
    for page, tree in python_blocks():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name in callables:
                wrong += [f"{page}: {name}({kw.arg}=...)" for kw in node.keywords
                          if kw.arg and not _accepts(callables[name], kw.arg)]
            elif (isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
                  and node.func.value.id == "attr"):
                method = getattr(Attributor, node.func.attr, None)
                if not callable(method):
                    wrong.append(f"{page}: attr.{node.func.attr}() (Attributor has no such method)")
                else:
                    wrong += [f"{page}: attr.{node.func.attr}({kw.arg}=...)" for kw in node.keywords
                              if kw.arg and not _accepts(method, kw.arg)]
    assert wrong == []


def test_the_readme_keeps_its_two_commands_first():
    """``.ci/run`` and a fresh clone run the README's first two blocks: install + the demo, install + the tests."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", open(PAGES[0], encoding="utf-8").read(), flags=re.S | re.M)
    assert blocks[0] == "pip install -e .\ndiffusion-trak demo\n"
    assert blocks[1] == 'pip install -e ".[test]"\npython -m pytest -q\n'


def test_the_readme_is_short():
    assert len(open(PAGES[0], encoding="utf-8").read().splitlines()) <= 250
